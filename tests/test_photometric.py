"""The multi-crop ops against their reference: torchvision's PIL backend, written out with PIL.

The fast path (OpenCV geometry on the host, light ops on the device) must give what PIL gives,
to about a grey level, op by op and composed in a random order.
"""
import io

import jax
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from sklearn.datasets import load_sample_images

from sdtl_jax.data import records
from sdtl_jax.data.augment import multicrop, photometric


@pytest.fixture(scope='module')
def photos():
    """Eight 64x48 crops of real photos (smooth areas, edges and texture), uint8."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(8):
        image = load_sample_images().images[i % 2]
        top, left = rng.integers(0, 300), rng.integers(0, 500)
        out.append(np.ascontiguousarray(image[top:top + 48:2, left:left + 64:2]))
    return np.stack(out)


def pil_hue(image: Image.Image, factor: float) -> Image.Image:
    """torchvision.transforms.functional_pil.adjust_hue."""
    h, s, v = image.convert('HSV').split()
    h = np.asarray(h, np.uint8) + np.uint8(int(factor * 255) % 256)  # wraps like np.uint8
    return Image.merge('HSV', (Image.fromarray(h, 'L'), s, v)).convert('RGB')


def pil_reference(image: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """torchvision ColorJitter -> RandomGrayscale -> DINO GaussianBlur -> Solarization."""
    pil = Image.fromarray(image)
    if ops[photometric.JITTER]:
        for op in ops[photometric.ORDER].astype(int):
            factor = float(ops[photometric.BRIGHTNESS + op])
            enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color,
                        None)[op]
            pil = pil_hue(pil, factor) if op == 3 else enhancer(pil).enhance(factor)
    if ops[photometric.GRAYSCALE]:
        pil = pil.convert('L').convert('RGB')
    if ops[photometric.BLUR_SIGMA]:
        pil = pil.filter(ImageFilter.GaussianBlur(float(ops[photometric.BLUR_SIGMA])))
    if ops[photometric.SOLARIZE]:
        pil = ImageOps.solarize(pil, 128)
    return np.asarray(pil, np.float64)


ONLY = dict(jitter_p=0.0, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
            grayscale_p=0.0, blur_p=0.0, blur_radius=(0.1, 2.0), solarize_p=0.0)


@pytest.mark.parametrize('name, probs, tolerance', [
    ('jitter', dict(jitter_p=1.0), 1.0),
    ('grayscale', dict(grayscale_p=1.0), 0.0),
    # PIL approximates the Gaussian by three box filters; the device computes it exactly.
    ('blur', dict(blur_p=1.0), 1.5),
    ('solarize', dict(solarize_p=1.0), 0.0),
    ('all', dict(jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.2), 2.0),
])
def test_ops_match_pil(photos, name, probs, tolerance):
    rng = np.random.default_rng(len(name))
    batch = np.concatenate([photos] * 4)
    ops = np.stack([photometric.sample(rng, **dict(ONLY, **probs)) for _ in batch])
    got = np.asarray(jax.jit(photometric.apply)(batch, ops))
    assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 255
    np.testing.assert_array_equal(got, np.round(got))        # integer-valued, as uint8
    want = np.stack([pil_reference(i, o) for i, o in zip(batch, ops)])
    diff = np.abs(got - want).mean(axis=(1, 2, 3))
    assert diff.max() <= tolerance, (name, diff.round(2), ops[diff.argmax()])
    changed = np.abs(got - batch).mean(axis=(1, 2, 3)) > 0.5
    assert changed.mean() > 0.3                                # the ops do something


def test_identity_without_ops(photos):
    ops = np.stack([photometric.sample(np.random.default_rng(0), **ONLY) for _ in photos])
    np.testing.assert_array_equal(np.asarray(photometric.apply(photos, ops)), photos)


@pytest.mark.parametrize('box', [(0, 0, 48, 64), (5, 3, 40, 30), (10, 10, 20, 24)])
def test_resized_crop_matches_pil_bicubic(photos, box):
    """OpenCV resampling with the antialiasing pre-filter vs PIL's antialiased bicubic."""
    image = np.concatenate([np.concatenate([photos[0], photos[1]], 1),
                            np.concatenate([photos[2], photos[3]], 1)], 0)   # 96 x 128
    for size in (24, 32, 56):
        top, left, h, w = box
        got = multicrop.resized_crop(image, box, size).astype(np.float64)
        want = np.asarray(Image.fromarray(image).resize(
            (size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)))
        assert got.shape == (size, size, 3)
        assert np.abs(got - want).mean() < 2.5, (box, size, np.abs(got - want).mean())


def test_tiny_regions_upscale_exactly_as_torchvision(photos):
    """Upscaling by 2x or more (e.g. the demo's 8x8 digits): PIL on the cropped region, as
    torchvision's resized_crop does, bit for bit."""
    region = photos[0][5:13, 7:14]
    got = multicrop.resized_crop(photos[0], (5, 7, 8, 7), 32)
    want = np.asarray(Image.fromarray(np.ascontiguousarray(region)).resize(
        (32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(got, want)


def test_jpeg_fast_path_bit_identical_to_pil(photos):
    for mode in ('RGB', 'L'):
        buf = io.BytesIO()
        Image.fromarray(photos[0]).convert(mode).save(buf, format='JPEG', quality=90)
        data = buf.getvalue()
        assert records._plain_jpeg(data)
        np.testing.assert_array_equal(records.decode_image(data),
                                      np.asarray(Image.open(io.BytesIO(data)).convert('RGB')))
    # CMYK and truncated JPEGs take PIL's path: converted, or an error naming the record.
    buf = io.BytesIO()
    Image.new('CMYK', (8, 8), (0, 255, 255, 0)).save(buf, format='JPEG')
    assert not records._plain_jpeg(buf.getvalue())
    assert records.decode_image(buf.getvalue()).shape == (8, 8, 3)
    assert not records._plain_jpeg(data[:len(data) // 2])
    with pytest.raises(records.CorruptRecordError, match='truncated/1'):
        records.decode_image(data[:len(data) // 2], 'truncated/1')
