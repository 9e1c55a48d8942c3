r"""CLI: ImageNet-100 (the CMC classes) from ImageNet-1k -> `imagenet100_real` shards.

From an extracted ImageNet-1k tree (`<src>/train/<wnid>/*.JPEG`; `<src>/val/<wnid>/*.JPEG`, or a
flat `<src>/val/ILSVRC2012_val_000xxxxx.JPEG` with ground truth; the root of Kaggle's download,
holding `ILSVRC/Data/CLS-LOC/` and `LOC_val_solution.csv`, works too):

    python -m sdtl_jax.datasets.imagenet100 --src=/data/imagenet

or from the published tars, read in place (only the 100 classes' inner tars are opened):

    python -m sdtl_jax.datasets.imagenet100 --train_tar=ILSVRC2012_img_train.tar \
        --val_tar=ILSVRC2012_img_val.tar --devkit=ILSVRC2012_devkit_t12.tar.gz

Ground truth of a flat validation set: the devkit's `data/ILSVRC2012_validation_ground_truth.txt`
(one ILSVRC2012_ID per image; IDs are not in sorted wnid order, `data/meta.mat` maps them to
wnids), from `--devkit` (tar.gz or extracted folder), or Kaggle's `LOC_val_solution.csv`
(ImageId, PredictionString starting with the wnid) through `--val_labels`; both are also looked
for in `--src` and its parent folders. Labels are the index in the sorted wnid list
(`sources.class_list('imagenet100')`). Record ids are `<wnid>/<file name>` whatever the
layout, so a tree and the tars give the same records. Output: `--out` (default
`$SDTL_DATA_DIR/imagenet100_real`), splits `train` (126,689 images) and `val` (5,000); see
`shards.py` for resuming and the unreadable-file lists.

In a tree, a class folder of the 100 classes that holds no files stops the import with one line
naming it, unless `--allow_empty_classes` keeps the class with 0 examples (and a warning line).
EXIF orientation is ignored (pixels stored as in the file, as torchvision's ImageFolder does)
unless `--exif_transpose`, which stores rotated images upright, as PNG. A file name that is
not valid UTF-8 is stored with its bytes escaped in the id and exact in `id_bytes` (see
`records.record_id`).
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from sdtl_jax import cli
from sdtl_jax.data import layout, records, sources
from sdtl_jax.datasets import archives, images, importer_cli, shards

NAME = 'imagenet100_real'
EXPECTED = {'train': 126_689, 'val': 5_000}
DEVKIT_GROUND_TRUTH = 'data/ILSVRC2012_validation_ground_truth.txt'
DEVKIT_META = 'data/meta.mat'
KAGGLE_GROUND_TRUTH = 'LOC_val_solution.csv'
KAGGLE_TREE = os.path.join('ILSVRC', 'Data', 'CLS-LOC')
_WNID = re.compile(r'n\d{8}')


def synsets_from_meta_mat(data: bytes) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's `meta.mat` (`synsets` struct array)."""
    import scipy.io

    synsets = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)['synsets']
    return {int(i): str(w) for i, w in zip(synsets['ILSVRC2012_ID'], synsets['WNID'])}


def ground_truth_from_devkit(ids_text: str, meta_mat: bytes, source: str) -> dict[str, str]:
    """{val file name: wnid} from the ground-truth text (line i = image i) and meta.mat."""
    synsets = synsets_from_meta_mat(meta_mat)
    out = {}
    for line_no, line in enumerate(ids_text.strip().splitlines(), 1):
        if not line.strip().isdigit() or int(line) not in synsets:
            raise ValueError(f'{source}:{line_no}: {line!r} is not an ILSVRC2012_ID of meta.mat')
        out[f'ILSVRC2012_val_{line_no:08d}.JPEG'] = synsets[int(line)]
    return out


def ground_truth_from_csv(path: str) -> dict[str, str]:
    """{val file name: wnid} from Kaggle's LOC_val_solution.csv."""
    out = {}
    with open(path, newline='') as f:
        for row_no, row in enumerate(csv.DictReader(f), 2):
            tokens = (row.get('PredictionString') or '').split()
            if not row.get('ImageId') or not tokens or not _WNID.fullmatch(tokens[0]):
                raise ValueError(f'{path}:{row_no}: expected "ImageId,PredictionString" with a '
                                 f'wnid first, got {row}')
            out[f'{row["ImageId"]}.JPEG'] = tokens[0]
    return out


def _devkit_files(devkit: str) -> tuple[str, bytes]:
    """(ground-truth text, meta.mat bytes) from the devkit's tar.gz or extracted folder."""
    if os.path.isdir(devkit):
        with open(os.path.join(devkit, DEVKIT_GROUND_TRUTH)) as f, \
                open(os.path.join(devkit, DEVKIT_META), 'rb') as m:
            return f.read(), m.read()
    files = archives.read_small(devkit, lambda n: n.endswith((DEVKIT_GROUND_TRUTH, DEVKIT_META)))
    text = next((v for k, v in files.items() if k.endswith(DEVKIT_GROUND_TRUTH)), None)
    meta = next((v for k, v in files.items() if k.endswith(DEVKIT_META)), None)
    if text is None or meta is None:
        raise FileNotFoundError(f'{devkit} lacks {DEVKIT_GROUND_TRUTH} or {DEVKIT_META}; pass '
                                f'the ILSVRC2012_devkit_t12.tar.gz of the ILSVRC2012 download')
    return text.decode(), meta


def _find_near(src: str | None, names: Sequence[str]) -> str | None:
    """The first of `names` in `src` or up to three parent folders (Kaggle puts the csv
    three levels above ILSVRC/Data/CLS-LOC)."""
    folder = os.path.abspath(src) if src else None
    for _ in range(4 if folder else 0):
        for name in names:
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
        folder = os.path.dirname(folder)
    return None


def read_ground_truth(val_labels: str | None, devkit: str | None,
                      src: str | None) -> dict[str, str]:
    """{val file name: wnid} from whichever ground truth was given or found next to `src`."""
    if val_labels and val_labels.endswith('.csv'):
        return ground_truth_from_csv(val_labels)
    if val_labels:
        # The devkit's text file holds ILSVRC2012_IDs; meta.mat (next to it in the devkit's
        # data/ folder, or in --devkit) maps them to wnids.
        meta_path = os.path.join(os.path.dirname(os.path.abspath(val_labels)), 'meta.mat')
        if devkit:
            meta = _devkit_files(devkit)[1]
        elif os.path.isfile(meta_path):
            with open(meta_path, 'rb') as m:
                meta = m.read()
        else:
            raise FileNotFoundError(f'{meta_path} is missing: {val_labels} holds ILSVRC2012_IDs, '
                                    f'which only the devkit\'s meta.mat maps to wnids; pass '
                                    f'--devkit=ILSVRC2012_devkit_t12.tar.gz')
        with open(val_labels) as f:
            return ground_truth_from_devkit(f.read(), meta, val_labels)
    devkit = devkit or _find_near(src, ('ILSVRC2012_devkit_t12.tar.gz', 'ILSVRC2012_devkit_t12'))
    if devkit:
        text, meta = _devkit_files(devkit)
        return ground_truth_from_devkit(text, meta, f'{devkit}/{DEVKIT_GROUND_TRUTH}')
    found = _find_near(src, (KAGGLE_GROUND_TRUTH,))
    if found:
        return ground_truth_from_csv(found)
    raise FileNotFoundError(
        'The validation images are in one flat folder or tar, so their labels need the ground '
        'truth: pass --devkit=ILSVRC2012_devkit_t12.tar.gz (or its extracted folder), or '
        f'--val_labels={KAGGLE_GROUND_TRUTH} (Kaggle), or sort val/ into <wnid>/ sub-folders.')


def _class_labels() -> dict[str, int]:
    return {w: i for i, w in enumerate(sources.class_list('imagenet100'))}


def flat_val_items(files: Sequence[images.Item], ground_truth: dict[str, str]
                   ) -> tuple[list[images.Item], list[tuple[str, str]]]:
    """The items of the 100 classes among flat val images, labelled by `ground_truth`.

    `files` are items whose id is the file name and whose label is not set yet.
    """
    labels = _class_labels()
    items, problems = [], []
    for item in files:
        wnid = ground_truth.get(item.id)
        if wnid is None:
            problems.append((item.source, 'no ground-truth label for this file name'))
        elif wnid in labels:
            items.append(item._replace(id=f'{wnid}/{item.id}', label=labels[wnid]))
    return sorted(items, key=lambda item: item.id), problems


def tree_items(src: str, split: str, ground_truth: dict[str, str] | None = None,
               allow_empty_classes: bool = False
               ) -> tuple[list[images.Item], list[tuple[str, str]]]:
    """Items of `<src>/<split>/`: class folders, or flat val files labelled by `ground_truth`.

    Raises `errors.UserError` when a class folder of the 100 classes holds no file, unless
    `allow_empty_classes` (then a warning line).
    """
    labels = _class_labels()
    root = os.path.join(src, split)
    if not os.path.isdir(root):
        raise FileNotFoundError(f'{root} is missing: --src must hold train/<wnid>/*.JPEG and '
                                f'val/ (class folders, or flat with ground truth)')
    entries = sorted(e.name for e in os.scandir(root) if not e.name.startswith('.'))
    paths = [os.path.join(root, e) for e in entries]
    if ground_truth is not None:
        return flat_val_items([images.Item(p, e, -1, images.file_stamp(p))
                               for e, p in zip(entries, paths)], ground_truth)
    items = []
    problems = [(p, 'not in a class folder') for p in paths if not os.path.isdir(p)]
    counts = {}
    for wnid in sorted(set(entries) & set(labels)):
        folder = os.path.join(root, wnid)
        if not os.path.isdir(folder):
            continue                        # a file named like a class: listed above
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            problems.append((folder, f'folder not listed: {type(e).__name__}: {e.strerror or e}'))
            names = []
        counts[folder] = 0
        for fname in names:
            if not fname.startswith('.'):
                path = os.path.join(folder, fname)
                items.append(images.Item(path, f'{wnid}/{fname}', labels[wnid],
                                               images.file_stamp(path)))
                counts[folder] += 1
    images.check_class_folders(counts, allow_empty=allow_empty_classes,
                                     where=f'[{NAME}/{split}] {records.printable(root)}')
    return items, problems


def needs_ground_truth(src: str) -> bool:
    """Whether `<src>/val` is flat (no class folders)."""
    root = os.path.join(src, 'val')
    return os.path.isdir(root) and not any(e.is_dir() for e in os.scandir(root))


def train_tar_items(path: str) -> list[images.Item]:
    """Items of the 100 classes in ILSVRC2012_img_train.tar (a tar of `<wnid>.tar` files)."""
    labels = _class_labels()
    wanted = {f'{w}.tar' for w in labels}
    print(f'Listing the inner tars of the 100 classes in {path} ...', flush=True)
    items = []
    for tar_name, members in archives.list_nested(path, lambda n: n in wanted).items():
        wnid = tar_name[:-len('.tar')]
        for m in members:
            fname = os.path.basename(m.name)
            items.append(images.Item(f'{path}/{tar_name}/{m.name}', f'{wnid}/{fname}',
                                           labels[wnid],
                                           member=(path, m.offset, m.size)))
    return sorted(items, key=lambda item: item.id)


def val_tar_items(path: str, ground_truth: dict[str, str]
                  ) -> tuple[list[images.Item], list[tuple[str, str]]]:
    """Items of the 100 classes in ILSVRC2012_img_val.tar (50,000 flat JPEGs)."""
    return flat_val_items([images.Item(f'{path}/{m.name}', os.path.basename(m.name), -1,
                                             member=(path, m.offset, m.size))
                           for m in archives.list_members(path)], ground_truth)


def import_imagenet100(out: str, *, src: str | None = None, train_tar: str | None = None,
                       val_tar: str | None = None, devkit: str | None = None,
                       val_labels: str | None = None, splits: Sequence[str] = ('train', 'val'),
                       records_per_shard: int = layout.DEFAULT_RECORDS_PER_SHARD,
                       num_threads: int = 8, allow_empty_classes: bool = False,
                       exif_transpose: bool = False) -> list[dict[str, Any]]:
    """Writes the requested splits of `imagenet100_real` into `out`; returns their summaries.

    `allow_empty_classes`: see `tree_items`; `exif_transpose`: see
    `images.checked_image`.
    """
    if not src and not (train_tar or val_tar):
        raise ValueError('Give --src (an ImageNet-1k folder) or --train_tar/--val_tar')
    for path in (src, train_tar, val_tar, devkit, val_labels):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f'{path} does not exist')
    if src and os.path.isdir(os.path.join(src, KAGGLE_TREE)):
        src = os.path.join(src, KAGGLE_TREE)     # the Kaggle download's root was given
    classes = sources.class_list('imagenet100')
    summaries = []
    for split in splits:
        if split not in EXPECTED:
            raise ValueError(f'ImageNet-100 splits are {sorted(EXPECTED)}, got {split!r}')
        tar = train_tar if split == 'train' else val_tar
        problems: list[tuple[str, str]] = []
        if tar and split == 'train':
            items = train_tar_items(tar)
        elif tar:
            items, problems = val_tar_items(tar, read_ground_truth(val_labels, devkit, src))
        elif src:
            gt = (read_ground_truth(val_labels, devkit, src)
                  if split == 'val' and needs_ground_truth(src) else None)
            items, problems = tree_items(src, split, gt, allow_empty_classes)
        else:
            raise ValueError(f'No source for split {split!r}: give --src or --{split}_tar')
        present = {item.id.split('/')[0] for item in items}
        print(f'[{NAME}/{split}] {len(items):,} images of {len(present)} classes listed',
              flush=True)
        missing = sorted(set(classes) - present)
        if missing:
            print(f'warning: [{NAME}/{split}] no images of {len(missing)} of the 100 classes, '
                  f'e.g. {missing[0]}', file=sys.stderr, flush=True)
        summary = shards.write_split(
            out, items, name=NAME, domain='real', classes=classes, split=split,
            items_per_shard=records_per_shard, num_threads=num_threads, problems=problems,
            load=images.image_loader(exif_transpose),
            settings=images.exif_settings(exif_transpose))
        shards.warn_count(NAME, split, summary['num_examples'], EXPECTED[split])
        summaries.append(summary)
    return summaries


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    for name, help_ in (
            ('src', 'ImageNet-1k folder holding train/<wnid>/ and val/.'),
            ('train_tar', 'ILSVRC2012_img_train.tar (instead of --src).'),
            ('val_tar', 'ILSVRC2012_img_val.tar (instead of --src).'),
            ('devkit', 'ILSVRC2012_devkit_t12.tar.gz or its folder: ground truth of a flat val '
                       'set.'),
            ('val_labels', f"{KAGGLE_GROUND_TRUTH} (Kaggle) or the devkit's "
                           'ILSVRC2012_validation_ground_truth.txt.')):
        flags.DEFINE_string(name, None, help_, flag_values=flag_values)
    flags.DEFINE_string('out', os.path.join(layout.default_data_dir(), NAME),
                        f'Dataset directory (default: $SDTL_DATA_DIR/{NAME}).',
                        flag_values=flag_values)
    flags.DEFINE_list('splits', ['train', 'val'], 'Splits to write: train, val.',
                      flag_values=flag_values)
    importer_cli.define_writer_flags(flag_values, class_folders=True)
    flags.adopt_module_key_flags(importer_cli, flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
    """Exit status: `importer_cli.run_command`'s."""
    f = flag_values
    return importer_cli.run_command(argv, lambda: import_imagenet100(
        f.out, src=f.src, train_tar=f.train_tar, val_tar=f.val_tar, devkit=f.devkit,
        val_labels=f.val_labels, splits=f.splits, records_per_shard=f.records_per_shard,
        num_threads=f.num_threads, allow_empty_classes=f.allow_empty_classes,
        exif_transpose=f.exif_transpose))


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
