"""Large JPEGs decode at reduced scale (libjpeg's DCT scaling) when their crops are far smaller.

The crops keep their geometry and random draws: boxes, flips and light ops are those of a full
decode with the same seed, and the pixels stay well within the resampler's tolerance against
PIL (test_photometric.py: 2.5 grey levels of mean absolute difference) of the full decode's
crops.
Other formats, and JPEGs close to their crops' size, decode in full exactly as before. Images
over `images.LARGE_IMAGE_PIXELS` get a warning line at import.
"""
import io
import re

import cv2
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from sdtl_jax.data import records
from sdtl_jax.data.augment import eval_view, multicrop, photometric
from sdtl_jax.datasets import image_folder, images

# Mean absolute difference per crop from the full decode's: measured 0.3-0.65; a box off by a
# fraction of a reduced pixel (its fractional offset dropped) gives 1.2-5.
TOLERANCE = 1.0


def _collage(height: int, width: int) -> np.ndarray:
    """Real photos at their own resolution, tiled (some mirrored): texture everywhere, as in a
    large photo, which upscaled content would not have."""
    photos = load_sample_images().images                                  # 427 x 640 each
    rows = [np.concatenate([photos[(r + c) % 2][:, ::1 if (r * 7 + c) % 3 else -1]
                            for c in range(-(-width // 640))], 1)
            for r in range(-(-height // 427))]
    return np.ascontiguousarray(np.concatenate(rows, 0)[:height, :width])


@pytest.fixture(scope='module')
def large():
    """A 4000 x 3000 photo collage as a quality-90 JPEG, and its full decode."""
    data = records.encode_jpeg(_collage(3000, 4000), quality=90)
    return data, records.decode_image(data)


@pytest.fixture
def factors(monkeypatch):
    """The scale factor of every `decode_jpeg` call."""
    seen, decode = [], records.decode_jpeg

    def spy(data, size, factor, record_id='?'):
        seen.append(factor)
        return decode(data, size, factor, record_id)

    monkeypatch.setattr(records, 'decode_jpeg', spy)
    return seen


@pytest.fixture
def boxes(monkeypatch):
    """(height, width, box) of every `random_resized_crop_box` draw."""
    seen, draw = [], multicrop.random_resized_crop_box

    def spy(height, width, scale, ratio, rng):
        box = draw(height, width, scale, ratio, rng)
        seen.append((height, width, box))
        return box

    monkeypatch.setattr(multicrop, 'random_resized_crop_box', spy)
    return seen


def full_decode_multicrop(transform: multicrop.MultiCrop, image: np.ndarray,
                          rng: np.random.Generator) -> tuple[dict[str, np.ndarray], list]:
    """MultiCrop as it was before reduced decoding: every crop from the full decode, its box,
    flip and light ops drawn crop by crop. Returns the output and the boxes."""
    out, drawn = {}, []
    height, width = image.shape[:2]
    for kind, count, size, scale, ops in (
            ('global', transform.num_global, transform.global_size, transform.global_scale,
             transform.global_ops),
            ('local', transform.num_local, transform.local_size, transform.local_scale,
             transform.local_ops)):
        crops, crop_ops = [], []
        for _ in range(count):
            box = multicrop.random_resized_crop_box(height, width, scale, transform.ratio, rng)
            drawn.append((height, width, box))
            crop = multicrop.resized_crop(image, box, size)
            crops.append(cv2.flip(crop, 1) if rng.random() < transform.flip_p else crop)
            crop_ops.append(photometric.sample(rng, **ops))
        if count:
            out[kind], out[f'{kind}_ops'] = np.stack(crops), np.stack(crop_ops)
    return out, drawn


def _record(data: bytes) -> bytes:
    return records.encode_record(data, 4, 'large/0')


def _diffs(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.abs(got.astype(np.float64) - want).mean(axis=(1, 2, 3))


@pytest.mark.parametrize('sizes, seed, factor', [
    ((224, 96), 0, 2),     # the paper's sizes: the global crop's box sets the factor
    ((224, 96), 1, 4),
    ((64, 32), 0, 8),
])
def test_reduced_decode_keeps_draws_and_pixels(large, factors, boxes, sizes, seed, factor):
    data, full = large
    transform = multicrop.MultiCrop(global_size=sizes[0], local_size=sizes[1])
    rng = np.random.default_rng(seed)
    out = transform.random_map(_record(data), rng)
    assert factors == [factor]                                       # one decode, reduced
    got_boxes = list(boxes)
    want_rng = np.random.default_rng(seed)
    want, want_boxes = full_decode_multicrop(transform, full, want_rng)
    # Same boxes in the full image's coordinates, same flips and light ops, same draws used.
    assert got_boxes == want_boxes and got_boxes[0][:2] == (3000, 4000)
    assert rng.random() == want_rng.random()
    for kind in ('global', 'local'):
        assert out[kind].shape == want[kind].shape and out[kind].dtype == np.uint8
        np.testing.assert_array_equal(out[f'{kind}_ops'], want[f'{kind}_ops'])
        diffs = _diffs(out[kind], want[kind])
        assert diffs.max() < TOLERANCE, (kind, diffs.round(2))
    assert out['label'] == 4


def test_small_jpeg_and_png_decode_in_full_as_before(large, factors):
    """ImageNet-size JPEGs at the paper's sizes, and PNGs whatever their size: the full decode
    and the crops of before, bit for bit."""
    _, full = large
    small = np.ascontiguousarray(full[1000:1375, 2000:2500])                   # 500 x 375
    cases = [(records.encode_jpeg(small, quality=90), multicrop.MultiCrop()),
             (records.encode_png(full[:1200, :1600]),
              multicrop.MultiCrop(global_size=64, local_size=32))]
    for data, transform in cases:
        out = transform.random_map(_record(data), np.random.default_rng(3))
        want, _ = full_decode_multicrop(transform, records.decode_image(data),
                                        np.random.default_rng(3))
        for key in want:
            np.testing.assert_array_equal(out[key], want[key])
    assert factors == [1]           # the JPEG, through the header; the PNG never gets there


@pytest.mark.parametrize('orientation', ['landscape', 'portrait'])
def test_eval_transform_reduced(large, factors, orientation):
    """Shorter side to 256, centre crop 224, from a 1/4-scale decode: the full decode's size
    and area, within tolerance of its pixels."""
    data, full = large
    if orientation == 'portrait':
        full = np.ascontiguousarray(full.transpose(1, 0, 2))
        data = records.encode_jpeg(full, quality=90)
        full = records.decode_image(data)
    out = eval_view.EvalTransform().map(_record(data))
    assert factors == [4]
    want = eval_view.center_crop(eval_view.resize_shorter(Image.fromarray(full), 256), 224)
    assert out['image'].shape == (224, 224, 3) and out['image'].dtype == np.uint8
    assert _diffs(out['image'][None], np.asarray(want)[None])[0] < TOLERANCE
    # Smaller than 4 x 256 on its shorter side: the full decode, exactly as before.
    small = records.encode_jpeg(full[:1000, :1000], quality=90)
    out = eval_view.EvalTransform().map(_record(small))
    want = eval_view.center_crop(eval_view.resize_shorter(records.decode_pil(small), 256),
                                  224)
    np.testing.assert_array_equal(out['image'], np.asarray(want))


def test_reduction_factor():
    """Every crop box keeps at least twice its output side along both axes once reduced."""
    assert records.reduction_factor([(3584, 4000, 224)]) == 8      # 3584 = 8 x 2 x 224
    assert records.reduction_factor([(3583, 4000, 224)]) == 4
    assert records.reduction_factor([(4000, 3583, 224)]) == 4      # both axes count
    assert records.reduction_factor([(3584, 4000, 224), (400, 400, 100)]) == 2
    assert records.reduction_factor([(399, 400, 100)]) == 1


def test_header_size_and_decode_errors(large, monkeypatch):
    data, full = large
    assert records.jpeg_size(data) == (3000, 4000)
    image = records.decode_jpeg(data, (3000, 4000), 8)
    assert image.shape == (375, 500, 3)
    # Pixel i covers the full image's pixels [8 i, 8 i + 8): the means of the blocks.
    blocks = full.reshape(375, 8, 500, 8, 3).mean(axis=(1, 3))
    assert np.abs(image - blocks).mean() < 2
    # PNGs, CMYK and truncated JPEGs have no size for the reduced decode.
    assert records.jpeg_size(records.encode_png(full[:8, :8])) is None
    cmyk = io.BytesIO()
    Image.new('CMYK', (8, 8)).save(cmyk, format='JPEG')
    assert records.jpeg_size(cmyk.getvalue()) is None
    assert records.jpeg_size(data[:len(data) // 2]) is None
    with pytest.raises(records.CorruptRecordError, match=r"'big/1'.*header says 4001 x 3000"):
        records.decode_jpeg(data, (3000, 4001), 4, 'big/1')
    monkeypatch.setattr(multicrop.cv2, 'imdecode', lambda *args: None)
    with pytest.raises(records.CorruptRecordError, match=r"'big/2'.*1/8 scale gave nothing"):
        records.decode_jpeg(data, (3000, 4000), 8, 'big/2')


def test_import_warns_about_large_images(tmp_path, monkeypatch, capsys):
    """One line per image over the pixel limit (lowered here), naming the file, its size and
    what training does with it."""
    monkeypatch.setattr(images, 'LARGE_IMAGE_PIXELS', 1200 * 1000)
    image = _collage(1000, 1300)
    folder = tmp_path / 'src' / 'cat'
    folder.mkdir(parents=True)
    (folder / 'big.jpg').write_bytes(records.encode_jpeg(image))
    (folder / 'big.png').write_bytes(records.encode_png(image))
    (folder / 'ok.jpg').write_bytes(records.encode_jpeg(image[:, :1200]))    # at the limit
    summary = image_folder.convert(str(tmp_path / 'src'), str(tmp_path / 'out'),
                                        split='train', domain='real')
    assert summary['num_examples'] == 3
    lines = sorted(line for line in capsys.readouterr().err.splitlines()
                   if line.startswith('warning:'))          # threads: in any order
    big = str(folder / 'big')
    assert lines == [
        f'warning: {big}.jpg: 1300 x 1000 pixels (1.3 MP, over 1.2 MP); training decodes this '
        'JPEG at 1/2 to 1/8 scale (as far as its crops allow), and a visit still costs as '
        'much as some 200 ImageNet-size images: downscale it if that matters',
        f'warning: {big}.png: 1300 x 1000 pixels (1.3 MP, over 1.2 MP); training decodes it '
        'in full at every visit (seconds each): downscale it, or store it as a plain 8-bit '
        'RGB JPEG, which training decodes at reduced scale']


def test_loader_benchmark_times_a_large_jpeg():
    from bench import loader_speed

    line = loader_speed.large_jpeg_line(side=3000, visits=1)
    match = re.fullmatch(r'  one 3,000 x 3,000 JPEG \([0-9.]+ MB\): ([0-9.]+) s per multi-crop '
                         r'visit, ([0-9.]+) s per evaluation visit \(median of 1\)', line)
    assert match and float(match[1]) > 0 and float(match[2]) > 0, line
