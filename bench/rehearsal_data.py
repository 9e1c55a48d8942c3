"""Raw datasets shaped like the published ones, for `bench.rehearsal`: what the importers meet.

- ImageNet-1k as extracted: `train/<wnid>/<wnid>_<k>.JPEG` for the 100 classes of ImageNet-100
  and a few classes outside it, a flat `val/ILSVRC2012_val_<8 digits>.JPEG` of all of them, and
  `ILSVRC2012_devkit_t12.tar.gz` with `data/meta.mat` and the validation ground truth.
- Oxford-IIIT Pet as published: `images.tar.gz` (`images/<Breed>_<k>.jpg`, and a `.mat` file the
  lists never name) and `annotations.tar.gz` (`trainval.txt`, `test.txt`, `list.txt`).

The photos are random but cost what photos cost: sizes drawn from ImageNet's common shapes
(most are 500 x 375 or 375 x 500, a few are larger), content with detail at every scale so a
JPEG is ~100 KB as ImageNet's are, quality 90 with 4:2:0 chroma, and a few grayscale and CMYK
JPEGs, which ImageNet also holds.
"""

from __future__ import annotations

import io
import os
import tarfile

import cv2
import numpy as np
from PIL import Image

from sdtl_jax.data import sources

# (width, height) and weight: the common shapes of ImageNet's training JPEGs.
IMAGENET_SIZES = (((500, 375), 0.45), ((375, 500), 0.15), ((500, 333), 0.15),
                  ((500, 500), 0.08), ((333, 500), 0.07), ((640, 480), 0.05),
                  ((1024, 768), 0.03), ((2048, 1536), 0.02))
PETS_SIZES = (((500, 375), 0.5), ((375, 500), 0.2), ((500, 333), 0.2), ((800, 600), 0.1))
JPEG_QUALITY = 90
# ImageNet classes outside ImageNet-100: the importer must leave them out.
OTHER_WNIDS = ('n01440764', 'n01443537')


def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An RGB uint8 image with detail at every scale (smooth colour fields, edges, texture)."""
    image = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((3, 90.0), (12, 45.0), (48, 25.0), (160, 12.0)):
        small = rng.normal(0, amplitude, (cells, max(1, cells * width // height), 3))
        image += cv2.resize(small.astype(np.float32), (width, height),
                            interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 14.0, image.shape).astype(np.float32)     # sensor-like grain
    return np.clip(image + 128, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, mode: str = 'RGB') -> bytes:
    """JPEG bytes at `JPEG_QUALITY`, 4:2:0; `mode` 'L' or 'CMYK' converts first."""
    buf = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buf, 'JPEG', quality=JPEG_QUALITY, subsampling=2)
    return buf.getvalue()


def _sizes(rng: np.random.Generator, table, n: int, scale: float) -> list[tuple[int, int]]:
    shapes, weights = zip(*table)
    picks = rng.choice(len(shapes), size=n, p=np.asarray(weights) / sum(weights))
    return [(max(8, round(shapes[i][0] * scale)), max(8, round(shapes[i][1] * scale)))
            for i in picks]


def _jpegs(rng: np.random.Generator, table, n: int, scale: float) -> list[bytes]:
    """`n` JPEGs; every 50th is grayscale and every 97th CMYK, as in ImageNet."""
    modes = ['L' if i % 50 == 7 else 'CMYK' if i % 97 == 11 else 'RGB' for i in range(n)]
    return [encode_jpeg(photo(rng, w, h), mode)
            for (w, h), mode in zip(_sizes(rng, table, n, scale), modes)]


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _meta_mat(ids: dict[str, int]) -> bytes:
    """The devkit's `meta.mat`: a `synsets` struct array with ILSVRC2012_ID, WNID, words."""
    import scipy.io

    synsets = np.zeros((len(ids), 1), dtype=[('ILSVRC2012_ID', 'O'), ('WNID', 'O'),
                                             ('words', 'O')])
    for row, (wnid, i) in enumerate(ids.items()):
        synsets[row, 0] = (np.array([[i]], np.uint16), np.array([wnid]), np.array([wnid]))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {'synsets': synsets})
    return buf.getvalue()


def make_imagenet(root: str, *, train_per_class: int, val_per_class: int, scale: float = 1.0,
                  seed: int = 0) -> dict[str, str]:
    """Writes the ImageNet-1k-shaped source under `root`; returns the importer's arguments
    (`src`, `devkit`) and the number of images written (`images`)."""
    rng = np.random.default_rng(seed)
    wnids = [*sources.class_list('imagenet100'), *OTHER_WNIDS]
    # ILSVRC2012_IDs are not in wnid order: the importer must map them through meta.mat.
    ids = {w: int(i) + 1 for w, i in zip(wnids, rng.permutation(len(wnids)))}
    for wnid in wnids:
        for k, data in enumerate(_jpegs(rng, IMAGENET_SIZES, train_per_class, scale)):
            _write(os.path.join(root, 'train', wnid, f'{wnid}_{k}.JPEG'), data)
    val_wnids = [w for w in wnids for _ in range(val_per_class)]
    val_wnids = [val_wnids[i] for i in rng.permutation(len(val_wnids))]
    for number, data in enumerate(_jpegs(rng, IMAGENET_SIZES, len(val_wnids), scale), 1):
        _write(os.path.join(root, 'val', f'ILSVRC2012_val_{number:08d}.JPEG'), data)
    devkit = os.path.join(root, 'ILSVRC2012_devkit_t12.tar.gz')
    with tarfile.open(devkit, 'w:gz') as tar:
        _add(tar, 'ILSVRC2012_devkit_t12/data/meta.mat', _meta_mat(ids))
        _add(tar, 'ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt',
             ''.join(f'{ids[w]}\n' for w in val_wnids).encode())
    return {'src': root, 'devkit': devkit,
            'images': len(wnids) * train_per_class + len(val_wnids)}


def make_pets(root: str, *, trainval_per_class: int, test_per_class: int, scale: float = 1.0,
              seed: int = 0) -> dict[str, str]:
    """Writes `images.tar.gz` and `annotations.tar.gz` into `root`; returns the importer's
    `src` and the number of listed images (`images`)."""
    rng = np.random.default_rng(seed)
    classes = sorted(sources.load_reference('pets37.json')['classes'], key=lambda c: c['label'])
    per_class = trainval_per_class + test_per_class
    header = '#Image CLASS-ID SPECIES BREED-ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n'
    lists = {'trainval.txt': header, 'test.txt': header}
    os.makedirs(root, exist_ok=True)
    with tarfile.open(os.path.join(root, 'images.tar.gz'), 'w:gz') as tar:
        for c in classes:
            species = 1 if c['species'] == 'cat' else 2
            for k, data in enumerate(_jpegs(rng, PETS_SIZES, per_class, scale), 1):
                name = f'{c["file_prefix"]}_{k}'
                _add(tar, f'images/{name}.jpg', data)
                which = 'trainval.txt' if k <= trainval_per_class else 'test.txt'
                lists[which] += f'{name} {c["class_id_1based"]} {species} 1\n'
        _add(tar, 'images/Abyssinian_100.mat', b'MATLAB 5.0 MAT-file')   # the real one has some
    with tarfile.open(os.path.join(root, 'annotations.tar.gz'), 'w:gz') as tar:
        for name, text in lists.items():
            _add(tar, f'annotations/{name}', text.encode())
        _add(tar, 'annotations/list.txt', header.encode())
    return {'src': root, 'images': len(classes) * per_class}
