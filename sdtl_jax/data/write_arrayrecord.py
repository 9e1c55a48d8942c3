r"""CLI: an image folder (one sub-folder per class) -> ArrayRecord shards + meta.json.

    python -m sdtl_jax.data.write_arrayrecord --src=/data/imagenet100/train \
        --out=$SDTL_DATA_DIR/imagenet100_real --split=train --domain=real

Labels: for a registered dataset (`--name`, default the basename of `--out`, e.g.
`imagenet100_real`) the registry's class order, matched against the folder names (ImageNet-100:
wnids; Pets: the official file prefixes such as 'Abyssinian', 'american_bulldog'); otherwise the
sorted folder names. Every file is decoded once to check it; JPEG and PNG bytes are stored as
they are, other formats (WebP, BMP, ...) re-encoded losslessly as PNG. Files that do not decode
are listed in `<out>/<split>_unreadable.txt` and counted in the output: nothing is skipped
silently. A `<image stem>.json` next to an image (e.g. Stable Diffusion provenance: generator,
prompt, seed) becomes the record's `meta`. Writing another split merges it into meta.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from PIL import Image

from sdtl_jax.data import records, sources, transforms

_KEEP_FORMATS = ('JPEG', 'PNG')


def _normalise(name: str) -> str:
    return name.lower().replace(' ', '_').replace('-', '_')


def class_folders(src: str, name: str) -> tuple[list[str], dict[str, int]]:
    """(classes, folder name -> label). Registered datasets use the registry's order."""
    folders = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith('.'))
    if not folders:
        raise FileNotFoundError(f'{src} has no class sub-folders (expected one per class)')
    if name not in sources.DATASETS:
        return folders, {f: i for i, f in enumerate(folders)}
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


def list_files(src: str, labels: dict[str, int]) -> tuple[list[tuple[str, int]], int]:
    """(relative path, label) for every file under the class folders, sorted; hidden count.

    `<stem>.json` files next to an image of the same stem are provenance, not images.
    """
    files, hidden = [], 0
    for folder, label in sorted(labels.items()):
        for root, dirs, names in os.walk(os.path.join(src, folder)):
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
            stems = {os.path.splitext(n)[0] for n in names if not n.endswith('.json')}
            for fname in sorted(names):
                if fname.startswith('.'):
                    hidden += 1
                elif not (fname.endswith('.json') and fname[:-len('.json')] in stems):
                    files.append((os.path.relpath(os.path.join(root, fname), src), label))
    return files, hidden


def load_image_bytes(path: str) -> bytes:
    """The bytes to store for one file: as is for JPEG/PNG, else PNG. Raises if undecodable."""
    with open(path, 'rb') as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format
    # Decode fully, through the same conversion the training pipeline uses.
    pil = transforms.decode_pil(data, path)
    if fmt in _KEEP_FORMATS:
        return data
    buf = io.BytesIO()
    pil.save(buf, format='PNG')
    return buf.getvalue()


def _read_one(src: str, rel: str) -> tuple[bytes | None, dict[str, Any], str | None]:
    path = os.path.join(src, rel)
    try:
        data = load_image_bytes(path)
    except Exception as e:  # any decode failure is reported, with its reason
        return None, {}, f'{type(e).__name__}: {e}'.replace('\n', ' ')
    meta: dict[str, Any] = {}
    sidecar = os.path.splitext(path)[0] + '.json'
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            meta = json.load(f)
    return data, meta, None


def convert(src: str, out: str, *, split: str, domain: str, name: str | None = None,
            records_per_shard: int = records.DEFAULT_RECORDS_PER_SHARD, num_threads: int = 8,
            log_every: int = 1000) -> dict[str, Any]:
    """Converts `src` into shards of `split` in `out`; returns a summary dict."""
    src, out = os.path.abspath(src), os.path.abspath(out)
    name = name or os.path.basename(out.rstrip(os.sep))
    if domain not in records.DOMAINS:
        raise ValueError(f'--domain must be one of {records.DOMAINS}, got {domain!r}')
    if name in sources.DATASETS and sources.get(name).domain != domain:
        raise ValueError(f'{name!r} is a {sources.get(name).domain} dataset, not {domain}')
    if not os.path.isdir(src):
        raise FileNotFoundError(f'--src={src} is not a directory')
    classes, labels = class_folders(src, name)
    files, hidden = list_files(src, labels)
    print(f'[{name}/{split}] {len(files)} files in {len(labels)} class folders of {src}'
          + (f' ({hidden} hidden files skipped)' if hidden else ''), flush=True)
    unreadable: list[tuple[str, str]] = []
    start = time.time()
    os.makedirs(out, exist_ok=True)
    with records.ShardWriter(out, split, num_classes=len(classes),
                             records_per_shard=records_per_shard) as writer, \
            concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        # PIL decodes outside the GIL, so threads check files in parallel; chunks keep the order
        # and bound the memory held by decoded-but-unwritten files.
        chunk = 32 * num_threads
        for lo in range(0, len(files), chunk):
            part = files[lo:lo + chunk]
            results = pool.map(lambda item: _read_one(src, item[0]), part)
            for i, ((rel, label), (data, meta, error)) in enumerate(zip(part, results), lo + 1):
                if error is not None:
                    unreadable.append((os.path.join(src, rel), error))
                else:
                    writer.write(data, label, rel, meta)
                if i % log_every == 0 or i == len(files):
                    print(f'[{name}/{split}] {i}/{len(files)} files, {writer.num_examples} '
                          f'written, {len(unreadable)} unreadable, '
                          f'{i / max(time.time() - start, 1e-9):.0f} files/s', flush=True)
        info = writer.close()
    unreadable_path = os.path.join(out, f'{split}_unreadable.txt')
    if unreadable:
        with open(unreadable_path, 'w') as f:
            f.writelines(f'{path}\t{error}\n' for path, error in unreadable)
        print(f'[{name}/{split}] {len(unreadable)} unreadable files not written; listed in '
              f'{unreadable_path}', flush=True)
    elif os.path.exists(unreadable_path):
        os.remove(unreadable_path)  # stale list from an earlier run of this split
    meta_path = records.add_split(out, name=name, domain=domain, classes=classes, split=split,
                                  info=info)
    print(f'[{name}/{split}] {info["num_examples"]} examples in {len(info["files"])} shards; '
          f'{meta_path} updated', flush=True)
    return {'name': name, 'split': split, 'num_examples': info['num_examples'],
            'files': info['files'], 'unreadable': [p for p, _ in unreadable],
            'hidden_skipped': hidden, 'classes': classes}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description='Image folder (one sub-folder per class) -> ArrayRecord shards + meta.json')
    parser.add_argument('--src', required=True, help='image folder, one sub-folder per class')
    parser.add_argument('--out', required=True, help='dataset directory, <data_dir>/<name>')
    parser.add_argument('--split', required=True,
                        help='train, val or test (Pets: train = the official trainval)')
    parser.add_argument('--domain', required=True, choices=records.DOMAINS)
    parser.add_argument('--name', default=None,
                        help=f'dataset name (default: basename of --out); registered: '
                             f'{", ".join(sorted(sources.DATASETS))}')
    parser.add_argument('--records_per_shard', type=int,
                        default=records.DEFAULT_RECORDS_PER_SHARD)
    parser.add_argument('--num_threads', type=int, default=8)
    args = parser.parse_args(argv)
    summary = convert(args.src, args.out, split=args.split, domain=args.domain, name=args.name,
                      records_per_shard=args.records_per_shard, num_threads=args.num_threads)
    return 1 if summary['num_examples'] == 0 else 0


if __name__ == '__main__':
    sys.exit(main())
