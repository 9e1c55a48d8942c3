r"""CLI: a TensorFlow Datasets dataset prepared as `array_record` -> sdtl_jax shards.

    pip install -e .[tfds]        # tensorflow-datasets, no TensorFlow
    python -m sdtl_jax.datasets.tfds --name=oxford_iiit_pet --tfds_data_dir=/data/tfds
    python -m sdtl_jax.datasets.tfds --name=imagenet2012   # keeps the 100 ImageNet-100 classes

Reads the encoded image bytes through `tfds.data_source(...)` with `SkipDecoding`, so neither
this import nor training needs TensorFlow (preparing most TFDS image datasets does; this command
only reads one already prepared with `file_format='array_record'`). TFDS class names are mapped
to the registry's class list case-insensitively: `oxford_iiit_pet` -> `pets_real` (all 37 must
map; TFDS `train` = the official trainval), `imagenet2012` -> `imagenet100_real` (`validation`
-> `val`; records of the other 900 classes are skipped and counted). A record whose label lies
outside the TFDS class list (e.g. -1, unlabelled) is listed in `<split>_unreadable.txt` with its
index and file name. Any other dataset keeps its own class list under its own name (`--dataset`
chooses the output name). Record ids are the TFDS `file_name` feature when there is one (for
ImageNet `<wnid>/<file name>`, as `imagenet100.py` names them), else
`<name>/<split>/<index>`; a `file_name` that is not valid UTF-8 is stored escaped, with its
exact bytes in `id_bytes` (`records.record_id`). EXIF orientation is ignored (pixels stored as
in the file, as torchvision's ImageFolder does) unless `--exif_transpose`, which stores rotated
images upright, as PNG.
"""

from __future__ import annotations

import collections.abc
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from sdtl_jax import cli
from sdtl_jax.data import layout, sources
from sdtl_jax.datasets import imagenet100, images, importer_cli, pets, shards

# TFDS name -> (registry name, {TFDS split: our split}).
KNOWN = {
    'oxford_iiit_pet': ('pets_real', {'train': 'train', 'test': 'test'}),
    'imagenet2012': ('imagenet100_real', {'train': 'train', 'validation': 'val'}),
}
EXPECTED = {pets.NAME: pets.EXPECTED,
            imagenet100.NAME: imagenet100.EXPECTED}


class RecordItems(collections.abc.Sequence):
    """The items of one TFDS split, made on demand (ImageNet has 1.28 M records)."""

    def __init__(self, name: str, split: str, num_records: int):
        self.name, self.split, self.num_records = name, split, num_records

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.num_records))]
        if not 0 <= index < self.num_records:
            raise IndexError(index)
        return images.Item(f'tfds:{self.name}/{self.split}[{index}]',
                                 f'{self.name}/{self.split}/{index}', -1, (index,))


class RecordLoader:
    """item -> Example for one TFDS split: maps the label, checks the image bytes."""

    def __init__(self, source: Any, label_map: np.ndarray, classes: Sequence[str],
                 wnid_ids: bool, skip_reason: str, exif_transpose: bool = False):
        self.source, self.label_map, self.classes = source, label_map, classes
        self.wnid_ids, self.skip_reason = wnid_ids, skip_reason
        self.exif_transpose = exif_transpose

    def __call__(self, item: images.Item) -> images.Example:
        index = item.stamp[0]
        example = self.source[index]
        file_name = example.get('file_name', b'')
        # Bytes that are not UTF-8 stay in the id as surrogate escapes, which the record keeps
        # exactly (records.record_id), instead of failing the record.
        file_name = (file_name.decode('utf-8', 'surrogateescape')
                     if isinstance(file_name, bytes) else str(file_name))
        where = f'{item.source} ({file_name})' if file_name else item.source
        tfds_label = int(example['label'])
        if not 0 <= tfds_label < len(self.label_map):
            raise ValueError(f'{where}: label {tfds_label} outside the TFDS class list '
                             f'[0, {len(self.label_map)})')
        label = int(self.label_map[tfds_label])
        if label < 0:
            raise images.Skip(self.skip_reason)
        record_id = item.id
        if file_name:
            record_id = f'{self.classes[label]}/{file_name}' if self.wnid_ids else file_name
        return images.Example(
            images.checked_image(example['image'], where, self.exif_transpose), label,
            record_id, {'tfds_index': index})


def label_mapping(tfds_names: Sequence[str], classes: Sequence[str],
                  dataset: str) -> np.ndarray:
    """For each TFDS label, its index in `classes` (case-insensitive), -1 if absent.

    Raises ValueError when a class of `classes` has no TFDS label.
    """
    index = {c.lower(): i for i, c in enumerate(classes)}
    mapping = np.array([index.get(n.lower(), -1) for n in tfds_names], dtype=np.int64)
    missing = sorted(set(range(len(classes))) - set(mapping.tolist()))
    if missing:
        raise ValueError(f'{len(missing)} classes of {dataset!r} have no TFDS label, e.g. '
                         f'{classes[missing[0]]!r} (TFDS names look like {list(tfds_names[:3])})')
    return mapping


def _builder(name: str, data_dir: str | None):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ValueError(f'tensorflow-datasets is not installed ({e}): pip install '
                         f'"sdtl_jax[tfds]" (no TensorFlow needed)') from None
    hint = (f'prepare it in array_record format first (`tfds build {name} '
            f'--file_format=array_record`, which needs TensorFlow for most image datasets), or '
            'use python -m sdtl_jax.datasets.pets or sdtl_jax.datasets.imagenet100 on the '
            'original archives')
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises its own DatasetNotFoundError and friends
        raise FileNotFoundError(
            f'TFDS dataset {name!r} not found in {data_dir}: {e}; {hint}') from None
    if not builder.is_prepared():
        raise FileNotFoundError(f'TFDS dataset {name!r} is not prepared in {builder.data_path}; '
                                f'{hint}')
    if str(builder.info.file_format.value) != 'array_record':
        raise ValueError(f'{builder.data_path} is in {builder.info.file_format.value} format; '
                         f'tfds.data_source needs array_record: {hint}')
    return tfds, builder


def import_tfds(name: str, out: str | None = None, *, tfds_data_dir: str | None = None,
                dataset: str | None = None, splits: dict[str, str] | None = None,
                records_per_shard: int = layout.DEFAULT_RECORDS_PER_SHARD,
                num_threads: int = 8, exif_transpose: bool = False) -> list[dict[str, Any]]:
    """Imports the given {TFDS split: our split} of TFDS dataset `name`; returns summaries.
    `exif_transpose`: see `images.checked_image`."""
    tfds, builder = _builder(name, tfds_data_dir)
    features = builder.info.features
    if 'image' not in features or 'label' not in features:
        raise ValueError(f'{name} has no "image" and "label" features (it has {list(features)})')
    tfds_names = list(features['label'].names)
    dataset = dataset or KNOWN.get(name, (name,))[0]
    splits = splits or KNOWN.get(name, (None, {s: s for s in builder.info.splits}))[1]
    if dataset in sources.DATASETS:
        info = sources.get(dataset)
        classes, domain = info.classes, info.domain
    else:
        classes, domain = tfds_names, 'real'
    label_map = label_mapping(tfds_names, classes, dataset)
    out = out or os.path.join(layout.default_data_dir(), dataset)
    # Shards of about records_per_shard records even when most records are skipped.
    items_per_shard = -(-records_per_shard * len(tfds_names) // int((label_map >= 0).sum()))
    decoders = {k: tfds.decode.SkipDecoding() for k, f in features.items()
                if isinstance(f, tfds.features.Image)}
    summaries = []
    for tfds_split, split in splits.items():
        if tfds_split not in builder.info.splits:
            raise ValueError(f'{name} has no split {tfds_split!r} (it has '
                             f'{list(builder.info.splits)})')
        source = builder.as_data_source(split=tfds_split, decoders=decoders)
        loader = RecordLoader(source, label_map, classes, dataset.startswith('imagenet100'),
                              f'TFDS classes outside the {len(classes)} classes of {dataset}',
                              exif_transpose)
        settings = {'tfds': name, 'version': str(builder.info.version), 'tfds_split': tfds_split,
                    'tfds_labels': tfds_names, **images.exif_settings(exif_transpose)}
        summary = shards.write_split(
            out, RecordItems(name, tfds_split, len(source)), name=dataset, domain=domain,
            classes=classes, split=split, load=loader, items_per_shard=items_per_shard,
            num_threads=num_threads, settings=settings)
        if split in EXPECTED.get(dataset, {}):
            shards.warn_count(dataset, split, summary['num_examples'],
                                    EXPECTED[dataset][split])
        summaries.append(summary)
    return summaries


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string('name', None, f'TFDS name, e.g. {", ".join(KNOWN)}.', required=True,
                        flag_values=flag_values)
    flags.DEFINE_string('tfds_data_dir', None, "TFDS data_dir (default: TFDS's, "
                        '~/tensorflow_datasets).', flag_values=flag_values)
    flags.DEFINE_string('dataset', None, 'Output dataset name (default: pets_real for '
                        'oxford_iiit_pet, imagenet100_real for imagenet2012, else the TFDS '
                        'name).', flag_values=flag_values)
    flags.DEFINE_string('out', None, 'Dataset directory (default: $SDTL_DATA_DIR/<dataset>).',
                        flag_values=flag_values)
    flags.DEFINE_list('splits', None, 'tfds_split:split pairs, e.g. train:train,validation:val '
                      '(default: the known mapping, else every TFDS split as is).',
                      flag_values=flag_values)
    importer_cli.define_writer_flags(flag_values)
    flags.adopt_module_key_flags(importer_cli, flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
    """Exit status: `importer_cli.run_command`'s."""
    f = flag_values
    splits = None
    if f.splits:
        splits = dict(s.split(':', 1) if ':' in s else (s, s) for s in f.splits)
    return importer_cli.run_command(argv, lambda: import_tfds(
        f.name, f.out, tfds_data_dir=f.tfds_data_dir, dataset=f.dataset, splits=splits,
        records_per_shard=f.records_per_shard, num_threads=f.num_threads,
        exif_transpose=f.exif_transpose))


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
