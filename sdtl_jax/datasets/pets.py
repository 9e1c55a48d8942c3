r"""CLI: Oxford-IIIT Pet from the official archives (or their folders) -> `pets_real` shards.

    python -m sdtl_jax.datasets.pets --src=/data/pets

`--src` holds the official `images.tar.gz` and `annotations.tar.gz`, or the folders `images/`
and `annotations/` they extract to (`--images`/`--annotations` point at them one by one). The
split lists `annotations/trainval.txt` and `annotations/test.txt` have lines
`Image CLASS-ID SPECIES BREED-ID` (class id 1..37, '#' lines are comments); label = CLASS-ID - 1,
the official order of `reference/pets37.json`, and the image's file prefix must be that class's
(a mismatch or an id outside 1..37 is reported with the file and line). Splits: `train` = the
official trainval list (3,680 images), `test` (3,669). The other files of images/ (a few
`*.mat`) are not in the lists and are never read. A compressed `images.tar.gz` is first copied
uncompressed into `<out>/.import-cache/` (deleted at the end) so that images can be read at
random; the output defaults to `$SDTL_DATA_DIR/pets_real`. See `shards.py` for resuming
and the unreadable-file lists. EXIF orientation is ignored (pixels stored as in the file, as
torchvision's ImageFolder does) unless `--exif_transpose`, which stores rotated images upright,
as PNG.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from sdtl_jax import cli
from sdtl_jax.data import layout, sources
from sdtl_jax.datasets import archives, importer_cli, shards
from sdtl_jax.datasets.images import Item, exif_settings, file_stamp, image_loader

NAME = 'pets_real'
EXPECTED = {'train': 3_680, 'test': 3_669}
LISTS = {'train': 'trainval.txt', 'test': 'test.txt'}
CACHE_DIR = '.import-cache'


def _locate(src: str | None, given: str | None, name: str) -> str:
    """The folder or archive of `name` ('images' or 'annotations')."""
    if given:
        if not os.path.exists(given):
            raise FileNotFoundError(f'{given} does not exist')
        return given
    candidates = [os.path.join(src, name + ext) for ext in ('', '.tar.gz', '.tar')] if src else []
    found = next((c for c in candidates if os.path.exists(c)), None)
    if found is None:
        where = f'in {src}' if src else '(no --src given)'
        raise FileNotFoundError(
            f'No {name}/ folder nor {name}.tar.gz {where}: download {name}.tar.gz from '
            f'https://www.robots.ox.ac.uk/~vgg/data/pets/ into --src, or pass --{name}=<path>')
    return found


def read_lists(annotations: str) -> dict[str, tuple[str, str]]:
    """{list file name: (source shown in reports, text)} of trainval.txt and test.txt."""
    wanted = set(LISTS.values())
    if os.path.isdir(annotations):
        out = {}
        for name in wanted:
            path = os.path.join(annotations, name)
            if os.path.isfile(path):
                with open(path) as f:
                    out[name] = (path, f.read())
    else:
        files = archives.read_small(annotations, lambda n: os.path.basename(n) in wanted)
        out = {os.path.basename(k): (f'{annotations}/{k}', v.decode()) for k, v in files.items()}
    missing = sorted(wanted - set(out))
    if missing:
        raise FileNotFoundError(f'{annotations} lacks {missing}: pass the official '
                                f'annotations.tar.gz or its extracted annotations/ folder')
    return out


def parse_list(text: str, source: str, classes: Sequence[str]
               ) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """([(image name, label)], [(file:line, problem)]) of one split list."""
    entries, problems = [], []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith('#'):
            continue
        where = f'{source}:{line_no}'
        fields = line.split()
        if len(fields) != 4 or not fields[1].isdigit():
            problems.append((where, f'expected "Image CLASS-ID SPECIES BREED-ID", got {line!r}'))
            continue
        image, class_id = fields[0], int(fields[1])
        if not 1 <= class_id <= len(classes):
            problems.append((where, f'class id {class_id} of {image} outside 1..{len(classes)}'))
        elif image.rsplit('_', 1)[0] != classes[class_id - 1]:
            problems.append((where, f'{image} has class id {class_id}, which is '
                                    f'{classes[class_id - 1]!r} in the official order'))
        else:
            entries.append((image, class_id - 1))
    return entries, problems


class ImageSource:
    """Where the images are: an images/ folder, or members of an (uncompressed) images tar."""

    def __init__(self, images: str, cache_dir: str):
        self.images = images
        self.members: dict[str, archives.Member] | None = None
        if not os.path.isdir(images):
            self.tar = archives.uncompressed(images, cache_dir)
            self.members = {os.path.basename(m.name): m for m in archives.list_members(self.tar)}

    def item(self, image: str, label: int) -> Item | None:
        """The item of `<image>.jpg`, None if it is missing."""
        fname = f'{image}.jpg'
        if self.members is None:
            path = os.path.join(self.images, fname)
            if not os.path.isfile(path):
                return None
            return Item(path, fname, label, file_stamp(path))
        m = self.members.get(fname)
        if m is None:
            return None
        return Item(f'{self.images}/{m.name}', fname, label,
                                 member=(self.tar, m.offset, m.size))


def import_pets(out: str, *, src: str | None = None, images: str | None = None,
                annotations: str | None = None, splits: Sequence[str] = ('train', 'test'),
                records_per_shard: int = layout.DEFAULT_RECORDS_PER_SHARD,
                num_threads: int = 8, exif_transpose: bool = False) -> list[dict[str, Any]]:
    """Writes the requested splits of `pets_real` into `out`; returns their summaries.
    `exif_transpose`: see `images.checked_image`."""
    for split in splits:
        if split not in LISTS:
            raise ValueError(f'Pets splits are {sorted(LISTS)}, got {split!r}')
    images = _locate(src, images, 'images')
    lists = read_lists(_locate(src, annotations, 'annotations'))
    classes = sources.class_list('pets')
    cache_dir = os.path.join(out, CACHE_DIR)
    image_source = ImageSource(images, cache_dir)
    summaries = []
    for split in splits:
        list_source, text = lists[LISTS[split]]
        entries, problems = parse_list(text, list_source, classes)
        items = []
        for image, label in sorted(entries, key=lambda e: (e[1], e[0])):
            item = image_source.item(image, label)
            if item is None:
                problems.append((os.path.join(images, f'{image}.jpg'),
                                 f'listed in {list_source} but missing'))
            else:
                items.append(item)
        summary = shards.write_split(
            out, items, name=NAME, domain='real', classes=classes, split=split,
            items_per_shard=records_per_shard, num_threads=num_threads, problems=problems,
            load=image_loader(exif_transpose),
            settings=exif_settings(exif_transpose))
        shards.warn_count(NAME, split, summary['num_examples'], EXPECTED[split])
        summaries.append(summary)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return summaries


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string('src', None, 'Folder holding images.tar.gz and annotations.tar.gz, or '
                        'images/ and annotations/.', flag_values=flag_values)
    flags.DEFINE_string('images', None, 'images.tar.gz or the images/ folder (overrides --src).',
                        flag_values=flag_values)
    flags.DEFINE_string('annotations', None, 'annotations.tar.gz or the annotations/ folder.',
                        flag_values=flag_values)
    flags.DEFINE_string('out', os.path.join(layout.default_data_dir(), NAME),
                        f'Dataset directory (default: $SDTL_DATA_DIR/{NAME}).',
                        flag_values=flag_values)
    flags.DEFINE_list('splits', ['train', 'test'], 'Splits to write; train = the official '
                      'trainval list.', flag_values=flag_values)
    importer_cli.define_writer_flags(flag_values)
    flags.adopt_module_key_flags(importer_cli, flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
    """Exit status: `importer_cli.run_command`'s."""
    f = flag_values
    return importer_cli.run_command(argv, lambda: import_pets(
        f.out, src=f.src, images=f.images, annotations=f.annotations, splits=f.splits,
        records_per_shard=f.records_per_shard, num_threads=f.num_threads,
        exif_transpose=f.exif_transpose))


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
