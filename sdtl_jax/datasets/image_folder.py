r"""CLI: an image folder (one sub-folder per class) -> ArrayRecord shards + meta.json.

    python -m sdtl_jax.datasets.image_folder --src=/data/imagenet100/train \
        --out=$SDTL_DATA_DIR/imagenet100_real --split=train --domain=real

Labels: for a registered dataset (`--name`, default the basename of `--out`, e.g.
`imagenet100_real`) the registry's class order, matched against the folder names (ImageNet-100:
wnids; Pets: the official file prefixes such as 'Abyssinian', 'american_bulldog'); otherwise the
sorted folder names. Record ids are the paths relative to `--src`. A `<image stem>.json` next to
an image (e.g. Stable Diffusion provenance: generator, prompt, seed) becomes the record's
`meta`. Writing another split merges it into meta.json.

The writing is `shards.write_split`'s: resumable (re-run the same command after a crash),
RGB JPEG/8-bit PNG kept byte for byte and anything else decodable converted to RGB PNG, files
that do not decode listed in `<out>/<split>_unreadable.txt` (nothing is skipped silently), and
`<out>/<split>.labels.npy` written beside the shards.

Odd inputs: one file never stops the import. A file name that is not valid UTF-8 (e.g.
b'bad\xff.jpg') is stored with the id `<class>/bad\xff.jpg` (the bytes escaped) and the exact
bytes in the record's `id_bytes` (`records.record_id`); listed as unreadable, it appears escaped
the same way. A class folder with no files stops the import with one line naming it, unless
`--allow_empty_classes` keeps its class with 0 examples (and a warning line). A sub-folder that
cannot be listed is listed as unreadable. EXIF orientation is ignored (pixels stored as in the
file, as torchvision's ImageFolder does) unless `--exif_transpose`, which stores rotated images
upright, as PNG.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from sdtl_jax import cli
from sdtl_jax.data import layout, records, sources
from sdtl_jax.datasets import images, importer_cli, shards
from sdtl_jax.errors import UserError


def _normalise(name: str) -> str:
    return name.lower().replace(' ', '_').replace('-', '_')


def class_folders(src: str, name: str) -> tuple[list[str], dict[str, int]]:
    """(classes, folder name -> label). Registered datasets use the registry's order; other
    classes are the sorted folder names (a name that is not valid UTF-8 escaped as
    `records.printable` does)."""
    folders = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith('.'))
    if not folders:
        raise FileNotFoundError(f'{src} has no class sub-folders (expected one per class)')
    if name not in sources.DATASETS:
        return [records.printable(f) for f in folders], {f: i for i, f in enumerate(folders)}
    classes = sources.get(name).classes
    index = {_normalise(c): i for i, c in enumerate(classes)}
    labels = {f: index.get(_normalise(f)) for f in folders}
    unknown = [f for f, label in labels.items() if label is None]
    if unknown:
        raise ValueError(f'{src}: folders {unknown[:5]} are not classes of {name!r} (its classes '
                         f'look like {classes[:3]}); rename them or pass another --name')
    absent = sorted(set(range(len(classes))) - set(labels.values()))
    if absent:
        print(f'warning: {len(absent)} classes of {name!r} have no folder in {src}, e.g. '
              f'{classes[absent[0]]!r}', file=sys.stderr)
    return classes, labels


def list_files(src: str, labels: dict[str, int],
               problems: list[tuple[str, str]] | None = None
               ) -> tuple[list[tuple[str, int]], int]:
    """(relative path, label) for every file under the class folders, sorted; hidden count.

    `<stem>.json` files next to an image of the same stem are provenance, not images. Folders
    that cannot be listed are appended to `problems` as (path, reason).
    """
    files, hidden = [], 0

    def walk_error(e: OSError) -> None:
        if problems is not None:
            problems.append((e.filename or '?', f'folder not listed: {type(e).__name__}: '
                                                f'{e.strerror or e}'))

    for folder, label in sorted(labels.items()):
        for root, dirs, names in os.walk(os.path.join(src, folder), onerror=walk_error):
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
            stems = {os.path.splitext(n)[0] for n in names if not n.endswith('.json')}
            for fname in sorted(names):
                if fname.startswith('.'):
                    hidden += 1
                elif not (fname.endswith('.json') and fname[:-len('.json')] in stems):
                    files.append((os.path.relpath(os.path.join(root, fname), src), label))
    return files, hidden


def load_with_sidecar(item: images.Item,
                      exif_transpose: bool = False) -> images.Example:
    """Reads and checks one image; a `<stem>.json` next to it becomes the record's meta."""
    example = images.load_item(item, exif_transpose)
    sidecar = os.path.splitext(item.source)[0] + '.json'
    if not os.path.isfile(sidecar):
        return example
    with open(sidecar) as f:
        return example._replace(meta=json.load(f))


def convert(src: str, out: str, *, split: str, domain: str, name: str | None = None,
            records_per_shard: int = layout.DEFAULT_RECORDS_PER_SHARD,
            num_threads: int = 8, allow_empty_classes: bool = False,
            exif_transpose: bool = False) -> dict[str, Any]:
    """Converts `src` into shards of `split` in `out` (resumable); returns the summary of
    `shards.write_split` plus 'classes' and 'hidden_skipped'.

    Raises `UserError` (before writing anything) when a class folder holds no file, unless
    `allow_empty_classes`; `exif_transpose`: see `images.checked_image`.
    """
    src, out = os.path.abspath(src), os.path.abspath(out)
    name = name or os.path.basename(out.rstrip(os.sep))
    if domain not in layout.DOMAINS:
        raise ValueError(f'--domain must be one of {layout.DOMAINS}, got {domain!r}')
    if name in sources.DATASETS and sources.get(name).domain != domain:
        raise ValueError(f'{name!r} is a {sources.get(name).domain} dataset, not {domain}')
    if not os.path.isdir(src):
        raise FileNotFoundError(f'--src={src} is not a directory')
    classes, labels = class_folders(src, name)
    problems: list[tuple[str, str]] = []
    files, hidden = list_files(src, labels, problems)
    per_label = {label: 0 for label in labels.values()}
    for _, label in files:
        per_label[label] += 1
    counts = {os.path.join(src, folder): per_label[label]
              for folder, label in sorted(labels.items())}
    where = f'[{name}/{split}] {records.printable(src)}'
    unlisted = [(path, reason) for path, reason in problems if counts.get(path) == 0]
    if unlisted and not allow_empty_classes:
        raise UserError(f'{where}: class folder {records.printable(unlisted[0][0])} cannot be '
                        f'read ({unlisted[0][1]}); fix it, or pass --allow_empty_classes to keep '
                        f'the class with 0 examples')
    images.check_class_folders(counts, allow_empty=allow_empty_classes, where=where)
    print(f'[{name}/{split}] {len(files)} files in {len(labels)} class folders of '
          f'{records.printable(src)}' + (f' ({hidden} hidden files skipped)' if hidden else ''),
          flush=True)
    items = []
    for rel, label in files:
        path = os.path.join(src, rel)
        sidecar = os.path.splitext(path)[0] + '.json'
        # A provenance sidecar is part of the record, so its changes restart the import too.
        stamp = images.file_stamp(path) + (
            images.file_stamp(sidecar) if os.path.isfile(sidecar) else ())
        items.append(images.Item(path, rel, label, stamp))
    load = (functools.partial(load_with_sidecar, exif_transpose=True) if exif_transpose
            else load_with_sidecar)
    summary = shards.write_split(
        out, items, name=name, domain=domain, classes=classes, split=split, load=load,
        items_per_shard=records_per_shard, num_threads=num_threads, problems=problems,
        settings=images.exif_settings(exif_transpose))
    return {**summary, 'classes': classes, 'hidden_skipped': hidden}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string('src', None, 'Image folder, one sub-folder per class.', required=True,
                        flag_values=flag_values)
    flags.DEFINE_string('out', None, 'Dataset directory, <data_dir>/<name>.', required=True,
                        flag_values=flag_values)
    flags.DEFINE_string('split', None, 'train, val or test (Pets: train = the official '
                        'trainval).', required=True, flag_values=flag_values)
    flags.DEFINE_enum('domain', None, layout.DOMAINS, 'What the images are.', required=True,
                      flag_values=flag_values)
    flags.DEFINE_string('name', None, 'Dataset name (default: basename of --out); registered: '
                        f'{", ".join(sorted(sources.DATASETS))}.', flag_values=flag_values)
    importer_cli.define_writer_flags(flag_values, class_folders=True)
    flags.adopt_module_key_flags(importer_cli, flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
    """Exit status: `importer_cli.run_command`'s."""
    f = flag_values
    return importer_cli.run_command(argv, lambda: [convert(
        f.src, f.out, split=f.split, domain=f.domain, name=f.name,
        records_per_shard=f.records_per_shard, num_threads=f.num_threads,
        allow_empty_classes=f.allow_empty_classes, exif_transpose=f.exif_transpose)])


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
