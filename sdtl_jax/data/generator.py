"""The generator interface (class prompt in, images + provenance out) and the dataset writer.

Both the demo's font renderer (`demo.FontDigitGenerator`) and a Stable Diffusion generator
implement `Generator`. `write_generated_dataset` asks one for `images_per_class` images of every
class, with one seed per image derived from (base seed, class, index), and writes them as PNG
records (provenance in each record's `meta`) plus meta.json with domain 'synth'. A generator that
has to re-sample an image (e.g. when a safety checker blanks it, SPEC.md section 8) records the
seed it finally used in the provenance; the request's seed stays the starting point.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sdtl_jax.data import records


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One image to generate."""
    class_index: int
    class_name: str
    prompt: str
    seed: int
    index: int                # the image's index within its class


@dataclasses.dataclass
class GeneratedImage:
    """A generated image (uint8 HxW or HxWx3) and where it came from.

    `provenance` holds at least 'generator', 'prompt', 'seed' and 'class', plus the generator's
    own settings (model, steps, guidance, font, jitter, ...).
    """
    image: np.ndarray
    provenance: dict[str, Any]


@runtime_checkable
class Generator(Protocol):
    """Makes images for class prompts, deterministically from each request's seed."""
    name: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GeneratedImage]:
        """One image per request, in order."""
        ...


def derive_seed(base_seed: int, class_index: int, index: int) -> int:
    """A 31-bit seed from (base seed, class, index): stable across runs, machines and batching."""
    state = np.random.SeedSequence([int(base_seed), int(class_index), int(index)])
    return int(state.generate_state(1, np.uint32)[0] >> 1)


def requests_for(classes: Sequence[str], prompts: Sequence[str], images_per_class: int,
                 seed: int) -> list[GenerationRequest]:
    """Every (class, index) request, class-major, with derived seeds."""
    if len(prompts) != len(classes):
        raise ValueError(f'Need one prompt per class: {len(prompts)} prompts, '
                         f'{len(classes)} classes')
    return [GenerationRequest(class_index=c, class_name=name, prompt=prompts[c],
                              seed=derive_seed(seed, c, i), index=i)
            for c, name in enumerate(classes) for i in range(images_per_class)]


def _check_image(image: np.ndarray, request: GenerationRequest) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
            image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(f'Generator returned {image.dtype}{list(image.shape)} for class '
                         f'{request.class_name!r} index {request.index}; expected uint8 HxW '
                         f'or HxWx3')
    return image


def write_generated_dataset(generator: Generator, *, classes: Sequence[str],
                            prompts: Sequence[str], images_per_class: int,
                            out_dir: str | os.PathLike, name: str, seed: int,
                            split: str = 'train', chunk_size: int = 64,
                            records_per_shard: int = records.DEFAULT_RECORDS_PER_SHARD,
                            verbose: bool = False) -> dict[str, Any]:
    """Generates `images_per_class` images per class into `out_dir` (shards + meta.json).

    Args:
      generator: any `Generator`.
      classes: class ids in label order (the registry's, for a registered dataset).
      prompts: one prompt per class.
      images_per_class: images to generate for each class.
      out_dir: the dataset directory (`<data_dir>/<name>`).
      name: dataset name written to meta.json.
      seed: base seed; image i of class c uses `derive_seed(seed, c, i)`.
      split: split name.
      chunk_size: requests per `generate` call (a batch for a diffusion model).

    Returns:
      The split's meta.json entry: {'files', 'num_examples', 'class_counts'}.
    """
    requests = requests_for(classes, prompts, images_per_class, seed)
    start = time.time()
    with records.ShardWriter(out_dir, split, num_classes=len(classes),
                             records_per_shard=records_per_shard) as writer:
        for lo in range(0, len(requests), chunk_size):
            chunk = requests[lo:lo + chunk_size]
            images = generator.generate(chunk)
            if len(images) != len(chunk):
                raise ValueError(f'{generator.name} returned {len(images)} images for '
                                 f'{len(chunk)} requests')
            for request, generated in zip(chunk, images):
                provenance = {'generator': generator.name, 'prompt': request.prompt,
                              'seed': request.seed, 'class': request.class_index,
                              'class_name': request.class_name, 'index': request.index,
                              **generated.provenance}
                writer.write(records.encode_png(_check_image(generated.image, request)),
                             request.class_index,
                             f'{name}/{split}/{request.class_index:04d}/{request.index:06d}',
                             provenance)
            if verbose:
                done = lo + len(chunk)
                print(f'[{name}/{split}] {done}/{len(requests)} images, '
                      f'{done / max(time.time() - start, 1e-9):.1f} images/s', flush=True)
        info = writer.close()
    records.add_split(out_dir, name=name, domain='synth', classes=classes, split=split,
                      info=info)
    return info
