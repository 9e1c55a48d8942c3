"""Generated datasets: the generator interface and the resumable, shardable writer.

A `Generator` (the demo's font renderer, `diffusion.DiffusionGenerator`) turns
`GenerationRequest`s (class, prompt, seed) into images plus provenance. `write_generated_split`
asks it for every requested (class, index) and stores the images as ArrayRecord records whose
`meta` is the provenance, so any image can be regenerated from its record:

- seeds come from `derive_seed(base seed, class, index)`; an image that must be re-sampled
  (a safety checker blanked it, docs/paper.md §8) takes the seeds of attempts 1, 2, ...
  (`GenerationRequest.seed_for`) and its record holds the seed finally used;
- the requests are planned into shards of `requests_per_shard` consecutive requests
  (class-major), so shard names and contents are known up front. Worker w of W writes the shards
  i with i % W == w (`--num_workers/--worker_index` of `python -m sdtl_jax.datasets.generate`)
  with `shards.write_planned`, the importers' engine: each under a temporary name, then its
  summary `<shard>.json`, then renamed; a finished shard is one whose final name exists.
  Killed at any moment and re-run, a worker redoes only unfinished shards, so no (class,
  index) is missing or duplicated;
- `<split>.plan.json` records what is being generated; a re-run with other settings is refused
  (naming the differing keys) instead of mixing two datasets in one directory;
- when every shard exists, `merge` (run by whichever worker finishes last, or on its own) writes
  `<split>.labels.npy`, the split's meta.json entry and `<split>.summary.json` (images and
  re-samples per class), and prints the summary.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sdtl_jax import fileio, metrics_io
from sdtl_jax.data import layout, records
from sdtl_jax.datasets import shards

PLAN_VERSION = 1
IMAGE_FORMATS = ('png', 'jpeg')


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One image to generate."""
    class_index: int
    class_name: str
    prompt: str
    seed: int                 # attempt 0's seed: derive_seed(base_seed, class_index, index)
    index: int                # the image's index within its class
    base_seed: int = 0

    def seed_for(self, attempt: int) -> int:
        """The seed of re-sampling attempt `attempt` (0 = the first try, `seed`)."""
        return self.seed if attempt == 0 else derive_seed(self.base_seed, self.class_index,
                                                           self.index, attempt)


@dataclasses.dataclass
class GeneratedImage:
    """A generated image (uint8 HxW or HxWx3) and where it came from.

    `provenance` holds the generator's settings (model, steps, guidance, font, jitter, ...) and,
    when the image was re-sampled, the 'seed' finally used and the number of 'resamples'.
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


def derive_seed(base_seed: int, class_index: int, index: int, attempt: int = 0) -> int:
    """A 31-bit seed from (base seed, class, index[, attempt]): stable across runs, machines and
    batching."""
    entropy = [int(base_seed), int(class_index), int(index)] + ([int(attempt)] if attempt else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0] >> 1)


def requests_for(classes: Sequence[str], prompts: Sequence[str], images_per_class: int,
                 seed: int, class_indices: Sequence[int] | None = None
                 ) -> list[GenerationRequest]:
    """Every (class, index) request, class-major, with derived seeds.

    `class_indices` restricts the requests to those classes (labels stay indices in `classes`).
    """
    if len(prompts) != len(classes):
        raise ValueError(f'Need one prompt per class: {len(prompts)} prompts, '
                         f'{len(classes)} classes')
    wanted = range(len(classes)) if class_indices is None else class_indices
    return [GenerationRequest(class_index=c, class_name=classes[c], prompt=prompts[c],
                              seed=derive_seed(seed, c, i), index=i, base_seed=seed)
            for c in wanted for i in range(images_per_class)]


def record_id(name: str, split: str, request: GenerationRequest) -> str:
    return f'{name}/{split}/{request.class_index:04d}/{request.index:06d}'


def _check_image(image: np.ndarray, request: GenerationRequest) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
            image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(f'Generator returned {image.dtype}{list(image.shape)} for class '
                         f'{request.class_name!r} index {request.index}; expected uint8 HxW '
                         f'or HxWx3')
    return image


def encode_image(image: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """The stored bytes of a generated image: lossless PNG, or JPEG at `jpeg_quality`."""
    if image_format == 'png':
        return records.encode_png(image)
    if image_format == 'jpeg':
        return records.encode_jpeg(image, quality=jpeg_quality)
    raise ValueError(f'image_format must be one of {IMAGE_FORMATS}, got {image_format!r}')


# ---------------------------------------------------------------------------------------------
# The plan and the files of a split being generated.

def _plan_path(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, f'{split}.plan.json')


def _summary_path(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, f'{split}.summary.json')


def _shard_summary_path(out_dir: str, shard: str) -> str:
    return os.path.join(out_dir, f'{shard}.json')


def make_plan(requests: Sequence[GenerationRequest], *, name: str, classes: Sequence[str],
              split: str, requests_per_shard: int, settings: Mapping[str, Any],
              versions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What a split's generation is: its requests (by fingerprint), shards and settings."""
    h = hashlib.sha256()
    for r in requests:
        h.update(repr((r.class_index, r.index, r.seed, r.prompt)).encode())
    num_shards = max(1, -(-len(requests) // requests_per_shard))
    return {'version': PLAN_VERSION, 'name': name, 'split': split, 'classes': list(classes),
            'num_requests': len(requests), 'requests_sha256': h.hexdigest(),
            'requests_per_shard': requests_per_shard, 'num_shards': num_shards,
            'files': [layout.shard_name(split, i, num_shards) for i in range(num_shards)],
            'settings': json.loads(json.dumps(dict(settings))),
            'versions': dict(versions or {})}


def _check_plan(out_dir: str, plan: Mapping[str, Any], overwrite: bool) -> None:
    """Writes the plan of a new split; refuses one that differs from the plan on disk."""
    path = _plan_path(out_dir, plan['split'])
    if os.path.exists(path) and not overwrite:
        with open(path) as f:
            old = json.load(f)
        keys = ('name', 'classes', 'num_requests', 'requests_sha256', 'requests_per_shard')
        differ = [k for k in keys if old.get(k) != plan[k]]
        old_settings, new_settings = old.get('settings', {}), plan['settings']
        differ += [f'settings.{k} ({old_settings.get(k)!r} -> {new_settings.get(k)!r})'
                   for k in sorted(set(old_settings) | set(new_settings))
                   if old_settings.get(k) != new_settings.get(k)]
        if differ:
            raise ValueError(
                f'{path} describes another generation (differing: {", ".join(differ)}). '
                f'Use another output directory, re-run with the settings of that plan, or '
                f'pass --overwrite to delete split {plan["split"]!r} there and start again.')
        changed = {k: (old.get('versions', {}).get(k), v) for k, v in plan['versions'].items()
                   if old.get('versions', {}).get(k) != v}
        if changed:
            print(f'warning: library versions differ from the start of this generation: '
                  f'{changed}; images may differ in the last bits', file=sys.stderr, flush=True)
        return
    if overwrite:
        _remove_split(out_dir, plan)
    fileio.write_json(path, plan)


def _remove_split(out_dir: str, plan: Mapping[str, Any]) -> None:
    """An earlier generation of the split, whatever its plan: the dataset's own meta.json names
    it (this plan's settings differ)."""
    split = plan['split']
    meta = {'name': plan['name'], 'domain': 'synth', 'classes': plan['classes']}
    if os.path.exists(os.path.join(out_dir, layout.META_FILE)):
        meta = layout.read_meta(out_dir)
    shards.clear_split(
        out_dir, split, name=meta['name'], domain=meta['domain'], classes=meta['classes'],
        also=lambda f: (f.startswith(f'{split}-') and f.endswith('.array_record.json')
                        or f in (f'{split}.plan.json', f'{split}.summary.json')))


def finished_shards(out_dir: str, plan: Mapping[str, Any]) -> list[int]:
    """Indices of the shards whose final file exists (their summary is written before)."""
    return [i for i, f in enumerate(plan['files'])
            if os.path.isfile(os.path.join(out_dir, f))
            and os.path.isfile(_shard_summary_path(out_dir, f))]


def worker_shards(num_shards: int, num_workers: int, worker_index: int) -> list[int]:
    """The shards worker `worker_index` of `num_workers` writes: every num_workers-th one."""
    if not 0 <= worker_index < num_workers:
        raise ValueError(f'worker_index must be in [0, {num_workers}), got {worker_index}')
    return list(range(worker_index, num_shards, num_workers))


# ---------------------------------------------------------------------------------------------
# Writing.

def _write_shard(path: str, requests: Sequence[GenerationRequest], generator: Generator, *,
                 name: str, split: str, num_classes: int, batch_size: int, image_format: str,
                 jpeg_quality: int, encoder: concurrent.futures.Executor,
                 progress: Callable[[int], None]) -> dict[str, Any]:
    """Generates the records of one shard and writes them to `path`; returns its summary.

    Encoding (PNG/JPEG) runs on `encoder`'s threads while the generator works on the next batch;
    records are written in request order.
    """
    labels: list[int] = []
    resamples: dict[str, int] = {}

    def generated() -> Iterator[tuple[GenerationRequest, np.ndarray, dict[str, Any]]]:
        for lo in range(0, len(requests), batch_size):
            batch = requests[lo:lo + batch_size]
            images = generator.generate(batch)
            if len(images) != len(batch):
                raise ValueError(f'{generator.name} returned {len(images)} images for '
                                 f'{len(batch)} requests')
            for request, result in zip(batch, images):
                if not 0 <= request.class_index < num_classes:
                    raise ValueError(f'class {request.class_index} outside [0, {num_classes})')
                image = _check_image(result.image, request)
                provenance = {'generator': generator.name, 'prompt': request.prompt,
                              'seed': request.seed, 'class': request.class_index,
                              'class_name': request.class_name, 'index': request.index,
                              **result.provenance}
                count = int(provenance.get('resamples', 0))
                if count:
                    key = str(request.class_index)
                    resamples[key] = resamples.get(key, 0) + count
                yield request, image, provenance
            progress(len(batch))

    def encode(item) -> bytes:
        return encode_image(item[1], image_format, jpeg_quality)

    # A window of two batches: one being encoded while the generator makes the next.
    with shards.open_shard(path) as writer:
        for (request, _, provenance), encoded in shards.ordered_map(encoder, encode, generated(),
                                                                     2 * batch_size):
            writer.write(records.encode_record(encoded, request.class_index,
                                               record_id(name, split, request), provenance))
            labels.append(request.class_index)
    return {'labels': labels, 'resamples': resamples}


def write_generated_split(generator: Generator, requests: Sequence[GenerationRequest], *,
                          out_dir: str | os.PathLike, name: str, classes: Sequence[str],
                          split: str = 'train', settings: Mapping[str, Any] | None = None,
                          versions: Mapping[str, str] | None = None,
                          requests_per_shard: int = layout.DEFAULT_RECORDS_PER_SHARD,
                          batch_size: int = 64, image_format: str = 'png',
                          jpeg_quality: int = 95, num_workers: int = 1, worker_index: int = 0,
                          encode_threads: int = 2, overwrite: bool = False,
                          verbose: bool = True) -> dict[str, Any] | None:
    """Generates this worker's shards of a split (resuming), and merges when all are there.

    Args:
      generator: any `Generator`.
      requests: every request of the split (all workers'), e.g. from `requests_for`.
      out_dir: the dataset directory (`<data_dir>/<name>`).
      name: the dataset name written to meta.json.
      classes: the class ids in label order.
      settings: the generator settings that shape the images (part of the plan; a re-run with
        other settings is refused). Library `versions` only warn when they change.
      requests_per_shard: images per shard.
      batch_size: requests per `generator.generate` call.
      image_format: 'png' (lossless) or 'jpeg' (`jpeg_quality`).
      num_workers, worker_index: this process's part of the shards.
      overwrite: delete an earlier generation of this split (other settings) first.

    Returns:
      The merged split summary (see `merge`) when all shards are finished, else None.
    """
    out_dir = os.fspath(out_dir)
    layout.check_split_name(split)
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f'image_format must be one of {IMAGE_FORMATS}, got {image_format!r}')
    if requests_per_shard < 1 or batch_size < 1:
        raise ValueError(f'requests_per_shard and batch_size must be >= 1, got '
                         f'{requests_per_shard} and {batch_size}')
    if not requests:
        raise ValueError('Nothing to generate: no requests')
    os.makedirs(out_dir, exist_ok=True)
    plan = make_plan(requests, name=name, classes=classes, split=split,
                     requests_per_shard=requests_per_shard,
                     settings={'generator': generator.name, 'image_format': image_format,
                               'jpeg_quality': jpeg_quality, **(settings or {})},
                     versions=versions)
    _check_plan(out_dir, plan, overwrite)
    mine = worker_shards(plan['num_shards'], num_workers, worker_index)
    done = set(finished_shards(out_dir, plan))
    todo = [i for i in mine if i not in done]

    def shard_requests(i: int) -> Sequence[GenerationRequest]:
        return requests[i * requests_per_shard:(i + 1) * requests_per_shard]

    total = sum(len(shard_requests(i)) for i in mine)
    initial = total - sum(len(shard_requests(i)) for i in todo)
    worker = f' worker {worker_index}/{num_workers}' if num_workers > 1 else ''
    with metrics_io.Progress(total=total, initial=initial, desc=f'{name}/{split}{worker}',
                             unit='img', dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
                             disable=not verbose) as bar, \
            concurrent.futures.ThreadPoolExecutor(encode_threads) as encoder:
        def fill(i: int, path: str) -> None:
            summary = _write_shard(path, shard_requests(i), generator, name=name, split=split,
                                   num_classes=len(classes), batch_size=batch_size,
                                   image_format=image_format, jpeg_quality=jpeg_quality,
                                   encoder=encoder, progress=bar.update)
            # Before the shard gets its final name, which marks it finished.
            fileio.write_json(_shard_summary_path(out_dir, plan['files'][i]), summary,
                              compact=True)

        # This worker's shards only: the other workers write theirs into the same folder.
        shards.write_planned(out_dir, split, plan['files'], todo, fill)
    left = plan['num_shards'] - len(finished_shards(out_dir, plan))
    if left:
        if verbose:
            print(f'[{name}/{split}]{worker} done; {left} shard(s) of other workers are not '
                  f'finished yet (the last worker to finish merges, or run with --merge)',
                  flush=True)
        return None
    return merge(out_dir, split, verbose=verbose)


@contextlib.contextmanager
def file_lock(path: str):
    """Holds an exclusive flock on `path` (created) for processes of one host."""
    with open(path, 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merge(out_dir: str | os.PathLike, split: str = 'train', *,
          verbose: bool = True) -> dict[str, Any]:
    """Writes labels, meta.json entry and `<split>.summary.json` of a fully generated split.

    Raises FileNotFoundError naming the missing shards when some are not finished.
    Returns {'name', 'split', 'num_examples', 'files', 'class_counts', 'resamples' (per class),
    'num_resamples'}.
    """
    out_dir = os.fspath(out_dir)
    path = _plan_path(out_dir, split)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: nothing was generated for split {split!r} '
                                f'in {out_dir}')
    with open(path) as f:
        plan = json.load(f)
    missing = [plan['files'][i] for i in range(plan['num_shards'])
               if i not in set(finished_shards(out_dir, plan))]
    if missing:
        raise FileNotFoundError(f'{len(missing)} of {plan["num_shards"]} shards of {out_dir} '
                                f'are not finished, e.g. {missing[0]}; run the remaining '
                                f'workers (the same command) first')
    with file_lock(os.path.join(out_dir, f'.{split}.merge.lock')):
        labels: list[int] = []
        resamples = np.zeros(len(plan['classes']), np.int64)
        for filename in plan['files']:
            with open(_shard_summary_path(out_dir, filename)) as f:
                shard = json.load(f)
            labels += shard['labels']
            for c, n in shard['resamples'].items():
                resamples[int(c)] += n
        if len(labels) != plan['num_requests']:
            raise ValueError(f'{out_dir}: shards hold {len(labels)} records, the plan '
                             f'{plan["num_requests"]}; re-run with --overwrite')
        info = shards.publish_split(out_dir, name=plan['name'], domain='synth',
                                    classes=plan['classes'], split=split, files=plan['files'],
                                    labels=labels)
        summary = {'name': plan['name'], 'split': split, **info,
                   'resamples': resamples.tolist(), 'num_resamples': int(resamples.sum()),
                   'settings': plan['settings'], 'versions': plan['versions']}
        fileio.write_json(_summary_path(out_dir, split), summary)
    if verbose:
        print(format_summary(summary), flush=True)
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few lines: totals, images per class, classes that needed re-sampling."""
    counts = {c: n for c, n in enumerate(summary['class_counts']) if n}
    most = max(counts.values())
    lines = [f'[{summary["name"]}/{summary["split"]}] {summary["num_examples"]:,} images in '
             f'{len(summary["files"])} shards: {most:,} per class for {len(counts)} classes; '
             f'{summary["num_resamples"]:,} re-sampled (safety checker)']
    fewer = {c: n for c, n in counts.items() if n < most}
    if fewer:
        lines.append('  classes with fewer images: ' + ', '.join(
            f'{c}: {n}' for c, n in fewer.items()))
    classes = [c for c, n in enumerate(summary['resamples']) if n]
    if classes:
        lines.append('  re-samples per class: ' + ', '.join(
            f'{c}: {summary["resamples"][c]}' for c in classes))
    return '\n'.join(lines)


def write_generated_dataset(generator: Generator, *, classes: Sequence[str],
                            prompts: Sequence[str], images_per_class: int,
                            out_dir: str | os.PathLike, name: str, seed: int,
                            split: str = 'train', chunk_size: int = 64,
                            records_per_shard: int = layout.DEFAULT_RECORDS_PER_SHARD,
                            verbose: bool = False) -> dict[str, Any]:
    """`images_per_class` PNG images of every class, in one process (the demo's synthetic data).

    Returns the split's meta.json entry: {'files', 'num_examples', 'class_counts'}.
    """
    start = time.time()
    summary = write_generated_split(
        generator, requests_for(classes, prompts, images_per_class, seed), out_dir=out_dir,
        name=name, classes=classes, split=split, settings={'seed': seed},
        requests_per_shard=records_per_shard, batch_size=chunk_size, verbose=verbose)
    if verbose:
        print(f'[{name}/{split}] {time.time() - start:.1f} s', flush=True)
    return {k: summary[k] for k in ('files', 'num_examples', 'class_counts')}
