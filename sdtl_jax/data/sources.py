"""Dataset registry: a name -> its shard files, class list, domain and counts, with clear errors.

Each dataset lives in `<data_dir>/<name>/` (meta.json + `<split>-NNNNN-of-MMMMM.array_record`,
see `layout.py`). `data_dir` defaults to `$SDTL_DATA_DIR`, else `~/.cache/sdtl_jax/data`.

- `digits_real`, `digits_synth`: the embedded demo (`datasets/digits.py`), built on first use,
  no download.
- `imagenet100_real`, `imagenet100_synth`: ImageNet-100 (CMC class list). Classes are the wnids
  in sorted order, the labels an image-folder loader gives (docs/paper.md §8); real and
  synthetic share them.
- `pets_real`, `pets_synth`: Oxford-IIIT Pet, 37 breeds in the official label order (classes are
  the official file prefixes, e.g. 'Abyssinian', 'american_bulldog'). Real splits: `train`
  holds the official trainval list (3,680 images), `test` the test list (docs/paper.md §8);
  every training split is called `train`, so one config key serves real and synthetic data.

The real data is imported once from the published files (resumable, bad files listed in
`<split>_unreadable.txt`): `python -m sdtl_jax.datasets.imagenet100` (an ImageNet-1k folder or
the ILSVRC2012 tars), `python -m sdtl_jax.datasets.pets` (the official archives),
`python -m sdtl_jax.datasets.tfds` (a TFDS dataset prepared as array_record). Any image
folder with one sub-folder per class, e.g. generated images, goes through
`python -m sdtl_jax.datasets.image_folder`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

from sdtl_jax.data import layout
from sdtl_jax.errors import UserError

_REFERENCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'reference')
# How each non-demo dataset is made into its folder `{out}`, besides `datasets/image_folder.py`
# from an image folder: the real ones imported from their published files, the synthetic generated.
MAKE_COMMANDS = {
    'imagenet100_real': (
        'python -m sdtl_jax.datasets.imagenet100 --src=<ImageNet-1k folder> --out={out}',
        'python -m sdtl_jax.datasets.tfds --name=imagenet2012 --out={out}'),
    'pets_real': (
        'python -m sdtl_jax.datasets.pets --src=<folder of the official archives> --out={out}',
        'python -m sdtl_jax.datasets.tfds --name=oxford_iiit_pet --out={out}'),
    'imagenet100_synth': (
        'python -m sdtl_jax.datasets.generate --config=configs/generate/imagenet100_sd14.py '
        '--outdir={out}',),
    'pets_synth': (
        'python -m sdtl_jax.datasets.generate --config=configs/generate/pets_sdxl.py '
        '--outdir={out}',),
}


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset, split or shard is not on disk: the message names the folder and the command
    that makes it. A FileNotFoundError too, for the callers that catch it as one."""


class DatasetMismatchError(UserError, ValueError):
    """A dataset on disk disagrees with the registry (classes, domain)."""


@dataclasses.dataclass(frozen=True)
class DatasetSplit:
    """One split of a dataset, as the input pipeline reads it."""
    name: str
    split: str
    files: list[str]          # absolute paths of the ArrayRecord shards
    num_examples: int
    classes: list[str]
    domain: str               # 'real' | 'synth'
    class_counts: list[int]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows about a dataset before any file is read."""
    name: str
    family: str               # 'digits' | 'imagenet100' | 'pets'
    domain: str               # 'real' | 'synth'
    splits: tuple[str, ...]   # the splits the experiments read
    demo: bool                # built on first use by datasets/digits.py
    description: str

    @property
    def classes(self) -> list[str]:
        """Class ids in label order."""
        return class_list(self.family)


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo('digits_real', 'digits', 'real', ('train', 'val'), True,
                'sklearn digits (1,797 images, 8x8), stratified 80/20 train/val split'),
    DatasetInfo('digits_synth', 'digits', 'synth', ('train', 'val'), True,
                'digits rendered from matplotlib fonts with affine jitter, 8x8 like the real'),
    DatasetInfo('imagenet100_real', 'imagenet100', 'real', ('train', 'val'), False,
                'ImageNet-100 (CMC subset): 126,689 train, 5,000 val images'),
    DatasetInfo('imagenet100_synth', 'imagenet100', 'synth', ('train',), False,
                'Stable Diffusion 1.4 images of the ImageNet-100 classes, 1,300 per class'),
    DatasetInfo('pets_real', 'pets', 'real', ('train', 'test'), False,
                'Oxford-IIIT Pet: train = the official trainval (3,680), test 3,669 images'),
    DatasetInfo('pets_synth', 'pets', 'synth', ('train',), False,
                'Stable Diffusion XL images of the 37 breeds, 100 per class'),
)}


def load_reference(filename: str) -> dict[str, Any]:
    """Parses one of the JSON files in sdtl_jax/reference/."""
    with open(os.path.join(_REFERENCE_DIR, filename)) as f:
        return json.load(f)


@functools.cache
def _class_list(family: str) -> tuple[str, ...]:
    if family == 'digits':      # the embedded demo's labels, defined where it is built
        from sdtl_jax.datasets import digits
        return digits.CLASSES
    if family == 'imagenet100':
        return tuple(sorted(c['wnid'] for c in load_reference('imagenet100.json')['classes']))
    if family == 'pets':
        classes = sorted(load_reference('pets37.json')['classes'], key=lambda c: c['label'])
        return tuple(c['file_prefix'] for c in classes)
    raise ValueError(f'Unknown dataset family {family!r}')


def class_list(family: str) -> list[str]:
    """The class ids of a family ('digits', 'imagenet100', 'pets'), in label order."""
    return list(_class_list(family))


def get(name: str) -> DatasetInfo:
    """The registry entry; ValueError listing the known names for an unknown one."""
    if name not in DATASETS:
        raise ValueError(f'Unknown dataset {name!r}; known datasets: {sorted(DATASETS)}')
    return DATASETS[name]


def _missing_message(info: DatasetInfo, dataset_dir: str, split: str, problem: str) -> str:
    """One line: which dataset is missing, where it was looked for, and the commands that make
    it there."""
    make = [f'`{command.format(out=dataset_dir)}`' for command in MAKE_COMMANDS.get(info.name, ())]
    make.append(f'from an image folder with one sub-folder per class ({len(info.classes)} '
                f'classes, e.g. {info.classes[0]!r}): `python -m sdtl_jax.datasets.image_folder '
                f'--src=<image folder> --out={dataset_dir} --split={split} '
                f'--domain={info.domain} --name={info.name}`')
    return (f'Dataset {info.name!r} ({info.description}) not found: {problem}; it needs '
            f'{layout.META_FILE} and the shards {split}-NNNNN-of-MMMMM.array_record. Make it: '
            f'{", or ".join(make)}; or point --config.data.data_dir (or $SDTL_DATA_DIR) at '
            f'the folder that holds {info.name}/')


def resolve(name: str, data_dir: str | os.PathLike | None = None,
            split: str = 'train') -> DatasetSplit:
    """Finds a dataset split on disk and checks it against the registry.

    The demo datasets are built on first use. Raises ValueError for an unknown name,
    DatasetMismatchError for a class list that differs from the registry's or a domain mismatch,
    DatasetNotFoundError (one line naming the expected folder, files and the commands that make
    them) when the data is not there.
    """
    info = get(name)
    data_dir = os.fspath(data_dir) if data_dir else layout.default_data_dir()
    dataset_dir = os.path.join(data_dir, name)
    if info.demo:
        # Imported here: runs on other data never import the code that builds datasets.
        from sdtl_jax.datasets import digits
        try:
            digits.ensure_demo_data(data_dir)
        except OSError as e:    # a data_dir that cannot be made or written
            raise DatasetNotFoundError(
                f'Dataset {name!r} is built on first use in {dataset_dir}, which failed '
                f'({type(e).__name__}: {e}); point --config.data.data_dir (or $SDTL_DATA_DIR) '
                'at a folder you can write') from e
    try:
        meta = layout.read_meta(dataset_dir)
    except FileNotFoundError:
        # read_meta's message says how to make any dataset folder; ours, this dataset's.
        problem = (f'{dataset_dir} has no {layout.META_FILE}' if os.path.isdir(dataset_dir)
                   else f'{dataset_dir} does not exist')
        raise DatasetNotFoundError(_missing_message(info, dataset_dir, split, problem)) from None
    meta_path = os.path.join(dataset_dir, layout.META_FILE)
    if meta['classes'] != info.classes:
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(meta['classes'], info.classes)) if a != b]
        raise DatasetMismatchError(
            f'{meta_path} lists {len(meta["classes"])} classes, the registry has '
            f'{len(info.classes)} for {name!r}; first differences (label, meta.json, registry): '
            f'{diff[:5]}. Labels must follow the registry order (real and synthetic share it): '
            f'rewrite the shards with python -m sdtl_jax.datasets.image_folder --name={name}.')
    if meta['domain'] != info.domain:
        raise DatasetMismatchError(f'{meta_path} says domain {meta["domain"]!r}, the registry '
                                   f'says {info.domain!r} for {name!r}; rewrite it with '
                                   f'python -m sdtl_jax.datasets.image_folder '
                                   f'--domain={info.domain} --name={name}')
    if split not in meta['splits']:
        raise DatasetNotFoundError(_missing_message(
            info, dataset_dir, split,
            f'{meta_path} has no split {split!r} (it has {sorted(meta["splits"])})'))
    return dataclasses.replace(split_from_dir(dataset_dir, split, meta=meta), name=name)


def split_from_dir(dataset_dir: str | os.PathLike, split: str,
                   meta: dict[str, Any] | None = None) -> DatasetSplit:
    """A split of any dataset directory (registered or not), checked for missing shards."""
    dataset_dir = os.fspath(dataset_dir)
    meta = meta or layout.read_meta(dataset_dir)
    meta_path = os.path.join(dataset_dir, layout.META_FILE)
    if split not in meta['splits']:
        raise DatasetNotFoundError(f'{meta_path} has no split {split!r} (it has '
                                   f'{sorted(meta["splits"])})')
    entry = meta['splits'][split]
    files = [os.path.join(dataset_dir, f) for f in entry['files']]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DatasetNotFoundError(f'{len(missing)} shard(s) listed in {meta_path} are '
                                   f'missing, e.g. {missing[0]}; rewrite split {split!r} with '
                                   f'python -m sdtl_jax.datasets.image_folder')
    return DatasetSplit(name=meta['name'], split=split, files=files,
                        num_examples=entry['num_examples'], classes=list(meta['classes']),
                        domain=meta['domain'], class_counts=list(entry['class_counts']))
