"""Table 1's augmentation pipelines (data/augment/pipelines.py, policies.py, pixmix.py) and
PixMix's fractal set (data/augment/fractals.py)."""

import io
import os
import pickle

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageOps

from sdtl_jax import config_lib
from sdtl_jax.data import records
from sdtl_jax.data.augment import eval_view, fractals, multicrop, pipelines, pixmix, policies

SIZE = 32  # the demo's crop size keeps every test fast; R = resize_side(32) = 37
RANDOM = ('pytorch', 'autoaugment', 'augmix', 'pixmix', 'multicrop')


def _picture(height=60, width=80, seed=0):
    """Gradients, a red box and a little noise: content that crops, flips and mixes visibly."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 90)], -1)
    image[height // 4:height // 2, width // 4:width * 5 // 8] = (240, 40, 40)
    noise = np.random.default_rng(seed).integers(-10, 11, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _jpeg(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, 'JPEG', quality=95)
    return buf.getvalue()


@pytest.fixture(scope='module')
def record():
    return records.encode_record(_jpeg(_picture()), label=7, id='test/0')


@pytest.fixture(scope='module')
def fractal_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('fractal_cache'))


def _config(name, fractal_cache, **kw):
    # Everything the project config carries, whatever the pipeline: unused keys must be ignored.
    config = dict(name=name, global_size=SIZE, local_size=16, num_global=1, num_local=0,
                  global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), pixmix_dir='',
                  pixmix_cache_dir=fractal_cache, pixmix_num_fractals=4)
    config.update(kw)
    return config


@pytest.fixture(scope='module')
def all_pipelines(fractal_cache):
    return {name: pipelines.build(_config(name, fractal_cache))
            for name in config_lib.AUGMENTATIONS}


def _run(transform, record, seed):
    return transform.random_map(record, np.random.default_rng(seed))


def test_pipeline_names():
    assert config_lib.AUGMENTATIONS == ('none', 'pytorch', 'autoaugment', 'augmix', 'pixmix',
                                 'multicrop')
    assert eval_view.resize_side(224) == 256 and eval_view.resize_side(SIZE) == 37


@pytest.mark.parametrize('name', config_lib.AUGMENTATIONS)
def test_output_contract(all_pipelines, record, name):
    out = _run(all_pipelines[name], record, seed=0)
    # Multi-crop also hands its light ops to the train step, which applies them when present.
    assert set(out) - ({'global_ops'} if name == 'multicrop' else set()) == {'global', 'label'}
    assert out['global'].shape == (1, SIZE, SIZE, 3) and out['global'].dtype == np.uint8
    assert out['label'].dtype == np.int32 and out['label'] == 7
    pixels = out['global'].astype(np.float64)
    assert 10 < pixels.mean() < 245 and pixels.std() > 5  # a picture, not a blank


@pytest.mark.parametrize('name', config_lib.AUGMENTATIONS)
def test_deterministic_under_a_seed(all_pipelines, record, name):
    first = _run(all_pipelines[name], record, seed=3)['global']
    np.testing.assert_array_equal(first, _run(all_pipelines[name], record, seed=3)['global'])
    others = [_run(all_pipelines[name], record, seed=s)['global'] for s in range(4, 12)]
    num_different = sum(not np.array_equal(first, o) for o in others)
    # Another seed draws another crop (or AutoAugment sub-policy), so every output changes.
    assert num_different == (0 if name == 'none' else len(others))


def test_none_is_the_eval_view(all_pipelines, record):
    expected = eval_view.EvalTransform(resize=37, crop=SIZE).map(record)['image']
    np.testing.assert_array_equal(_run(all_pipelines['none'], record, 0)['global'][0], expected)
    default_size = pipelines.build({'name': 'none'})
    assert _run(default_size, record, 0)['global'].shape == (1, 224, 224, 3)


def test_pytorch_crops_and_flips(all_pipelines, record):
    image, _ = records.record_image(record)
    num_flipped = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        top, left, h, w = multicrop.random_resized_crop_box(60, 80, (0.08, 1.0), (3 / 4, 4 / 3),
                                                             rng)
        crop = np.asarray(image.crop((left, top, left + w, top + h)).resize(
            (SIZE, SIZE), Image.Resampling.BILINEAR))
        flip = rng.random() < 0.5
        num_flipped += flip
        out = _run(all_pipelines['pytorch'], record, seed)['global'][0]
        np.testing.assert_array_equal(out, crop[:, ::-1] if flip else crop)
    assert 3 <= num_flipped <= 17


# --- AutoAugment ------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def square():
    return Image.fromarray(_picture(SIZE, SIZE, seed=1))


def test_autoaugment_magnitude_tables():
    space = policies.autoaugment_space(10, 224, 224)
    np.testing.assert_allclose(space['Solarize'][0], 255 * (1 - np.arange(10) / 9), rtol=1e-6)
    np.testing.assert_allclose(space['Rotate'][0], np.arange(10) * 30 / 9, rtol=1e-6)
    np.testing.assert_allclose(space['Color'][0], np.arange(10) * 0.1, atol=1e-7)
    assert list(space['Posterize'][0]) == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert [signed for _, signed in space.values()].count(True) == 9
    assert list(policies.augmix_space(10, 224, 224)['Posterize'][0][:3]) == [4, 4, 3]
    assert len(policies.augmix_space(10, 224, 224)) == 13
    assert len(policies.augmix_space(10, 224, 224, all_ops=False)) == 9


def test_imagenet_policy():
    assert len(policies.IMAGENET_POLICY) == 25
    space = policies.autoaugment_space(10, 224, 224)
    for sub_policy in policies.IMAGENET_POLICY:
        assert len(sub_policy) == 2
        for name, p, magnitude_id in sub_policy:
            assert name in space and 0 <= p <= 1
            assert (magnitude_id is None) == (space[name][0] is None)


def test_pointwise_ops_by_hand(square):
    x = np.asarray(square).astype(np.int64)

    def op(name, magnitude):
        return np.asarray(policies.apply_op(square, name, magnitude)).astype(np.int64)

    np.testing.assert_array_equal(op('Invert', 0.0), 255 - x)
    threshold = float(policies.autoaugment_space(10, SIZE, SIZE)['Solarize'][0][5])  # 113.33
    np.testing.assert_array_equal(op('Solarize', threshold), np.where(x < 114, x, 255 - x))
    np.testing.assert_array_equal(op('Posterize', 5), x & 0b11111000)
    np.testing.assert_array_equal(op('Identity', 0.0), x)
    # PIL's equalize: per channel, a LUT from the cumulative histogram, step = (n - last) // 255.
    expected = np.empty_like(x)
    for c in range(3):
        hist = np.bincount(x[..., c].ravel(), minlength=256)
        step = (hist.sum() - hist[np.nonzero(hist)[0][-1]]) // 255
        lut = (step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])) // step
        expected[..., c] = np.clip(lut, 0, 255)[x[..., c]]
    np.testing.assert_array_equal(op('Equalize', 0.0), expected)
    np.testing.assert_array_equal(op('Equalize', 0.0),
                                  np.asarray(ImageOps.equalize(square)).astype(np.int64))
    np.testing.assert_array_equal(op('AutoContrast', 0.0),
                                  np.asarray(ImageOps.autocontrast(square)))
    # Colour ops at magnitude 0 (factor 1) change nothing.
    for name in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
        np.testing.assert_array_equal(op(name, 0.0), x)
    assert op('Brightness', -0.5).mean() < x.mean() - 20


def test_geometric_ops_by_hand(square):
    x = np.asarray(square)
    # Positive TranslateX moves the picture right and fills with 0 (torchvision's convention).
    out = np.asarray(policies.apply_op(square, 'TranslateX', 5.7))
    np.testing.assert_array_equal(out[:, 5:], x[:, :-5])
    assert not out[:, :5].any()
    out = np.asarray(policies.apply_op(square, 'TranslateY', -3.2))
    np.testing.assert_array_equal(out[:-3], x[3:])
    # Positive Rotate turns counter-clockwise, as PIL and torchvision do.
    np.testing.assert_array_equal(np.asarray(policies.apply_op(square, 'Rotate', 90.0)),
                                  np.rot90(x))
    # ShearX by m about the top-left corner, nearest: out(x, y) = in(x + m y, y), fill 0.
    m = 0.3
    out = np.asarray(policies.apply_op(square, 'ShearX', m))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    src = np.floor(xx + 0.5 + m * (yy + 0.5)).astype(int)
    inside = src < SIZE
    np.testing.assert_array_equal(out[inside], x[yy[inside], src[inside]])
    assert not out[~inside].any()
    out = np.asarray(policies.apply_op(square, 'ShearY', -m))
    src = np.floor(yy + 0.5 - m * (xx + 0.5)).astype(int)
    inside = src >= 0
    np.testing.assert_array_equal(out[inside], x[src[inside], xx[inside]])
    assert not out[~inside].any()


def test_auto_augment_applies_the_drawn_sub_policy(square, monkeypatch):
    monkeypatch.setattr(policies, 'IMAGENET_POLICY',
                        ((('Invert', 1.0, None), ('Posterize', 1.0, 8)),))
    out = policies.auto_augment(square, np.random.default_rng(0))
    np.testing.assert_array_equal(np.asarray(out), (255 - np.asarray(square)) & 0b11110000)
    monkeypatch.setattr(policies, 'IMAGENET_POLICY',
                        ((('Invert', 0.0, None), ('Rotate', 0.0, 9)),))
    out = policies.auto_augment(square, np.random.default_rng(0))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(square))


def test_autoaugment_pipeline_augments_the_eval_view(all_pipelines, record):
    plain = _run(all_pipelines['none'], record, 0)['global']
    outs = [_run(all_pipelines['autoaugment'], record, s)['global'] for s in range(30)]
    num_changed = sum(not np.array_equal(plain, o) for o in outs)
    # Each sub-policy leaves the view untouched with probability (1 - p1)(1 - p2): ~20% overall.
    assert 15 <= num_changed < 30


# --- AugMix and PixMix ------------------------------------------------------------------------

def _corr(a, b):
    return np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1]


@pytest.mark.parametrize('name, min_changed, min_median_corr',
                         [('augmix', 20, 0.8), ('pixmix', 12, 0.3)])
def test_mixing_changes_the_crop_but_keeps_its_content(all_pipelines, record, name, min_changed,
                                                       min_median_corr):
    # Both draw the crop first, so a seed gives them the `pytorch` pipeline's crop to mix.
    changed, corrs = 0, []
    for seed in range(20):
        crop = _run(all_pipelines['pytorch'], record, seed)['global']
        out = _run(all_pipelines[name], record, seed)['global']
        if not np.array_equal(crop, out):
            changed += 1
            corrs.append(_corr(crop, out))
    assert changed >= min_changed
    assert np.median(corrs) > min_median_corr


class _FixedDirichlet:
    """A Generator whose Dirichlet draws are fixed; everything else comes from `rng`."""

    def __init__(self, rng, weights):
        self.rng, self.weights = rng, list(weights)

    def dirichlet(self, alpha):
        return np.asarray(self.weights.pop(0), np.float64)

    def __getattr__(self, name):
        return getattr(self.rng, name)


def test_augmix_mixing_weights(square):
    x = np.asarray(square)
    # All the weight on the original: the chains are drawn but contribute nothing.
    rng = _FixedDirichlet(np.random.default_rng(0), [[1.0, 0.0], [0.2, 0.3, 0.5]])
    np.testing.assert_array_equal(policies.augmix(square, rng), x)
    # Half on the original, half on chains of depth 1 whose ops are all identities here:
    # a constant picture is a fixed point of Posterize(4), AutoContrast, Equalize, ...; float
    # mixing then truncates, as torchvision's `.to(torch.uint8)` does.
    grey = Image.new('RGB', (SIZE, SIZE), (128, 128, 128))
    rng = _FixedDirichlet(np.random.default_rng(1), [[0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    out = policies.augmix(grey, rng, chain_depth=1, all_ops=False, severity=1)
    assert out.dtype == np.uint8 and out.shape == (SIZE, SIZE, 3)
    assert set(np.unique(out)) <= {127, 128}


def test_pixmix_mixings_match_the_official_formulas():
    rng = np.random.default_rng(0)
    img1, img2 = rng.random((2, 4, 4, 3), dtype=np.float32)
    for seed in range(6):
        ref = np.random.default_rng(seed)
        if ref.random() < 0.5:
            a, b = np.float32(ref.beta(4, 1)), np.float32(ref.beta(1, 4))
        else:
            a, b = 1 + np.float32(ref.beta(1, 4)), -np.float32(ref.beta(1, 4))
        x1, x2 = img1 * 2 - 1, img2 * 2 - 1
        np.testing.assert_array_equal(
            pixmix._add(img1, img2, 4, np.random.default_rng(seed)), (a * x1 + b * x2 + 1) / 2)
        x1, x2 = img1 * 2, img2 * 2
        np.testing.assert_array_equal(
            pixmix._multiply(img1, img2, 4, np.random.default_rng(seed)),
            (x1 ** a) * (np.clip(x2, 1e-37, None) ** b) / 2)


def test_pixmix_ops(square):
    rng = np.random.default_rng(0)
    for name in pixmix.PIXMIX_ALL_OPS:
        out = pixmix._pixmix_op(square, name, 1, rng)
        assert out.size == square.size and out.mode == 'RGB', name
    # As in pixmix_utils.py, autocontrast and equalize draw no level: the stream stays aligned.
    for name in ('autocontrast', 'equalize'):
        state = rng.bit_generator.state
        pixmix._pixmix_op(square, name, 1, rng)
        assert rng.bit_generator.state == state
    # At severity 1 (ImageNet) posterize keeps 4 bits and solarize inverts only near-white.
    x = np.asarray(square).astype(int)
    np.testing.assert_array_equal(np.asarray(pixmix._pixmix_op(square, 'posterize', 1, rng)),
                                  x & 0b11110000)
    out = np.asarray(pixmix._pixmix_op(square, 'solarize', 1, rng)).astype(int)
    np.testing.assert_array_equal(out[x < 231], x[x < 231])


def _write_pictures(directory, colours):
    os.makedirs(os.path.join(directory, 'sub'), exist_ok=True)
    for i, colour in enumerate(colours):
        Image.new('RGB', (50 + 10 * i, 45), colour).save(
            os.path.join(directory, 'sub' if i % 2 else '', f'p{i}.png'))


def test_pixmix_with_a_folder(tmp_path, record, all_pipelines, fractal_cache):
    folder = str(tmp_path / 'mixing')
    _write_pictures(folder, [(0, 0, 255), (255, 255, 0)])
    with open(os.path.join(folder, 'notes.txt'), 'w') as f:
        f.write('not a picture')
    transform = pipelines.build(_config('pixmix', fractal_cache, pixmix_dir=folder))
    assert len(transform.mixing) == 2
    assert transform.mixing[0].size == (50, 45)
    outs = [_run(transform, record, s)['global'] for s in range(10)]
    assert len({o.tobytes() for o in outs}) > 5
    # Same seeds, same crops and decisions, another mixing set: some outputs differ.
    fractal_outs = [_run(all_pipelines['pixmix'], record, s)['global'] for s in range(10)]
    assert any(not np.array_equal(a, b) for a, b in zip(outs, fractal_outs))


def test_pixmix_folder_errors(tmp_path):
    missing = str(tmp_path / 'nope')
    with pytest.raises(ValueError, match='nope'):
        pipelines.build({'name': 'pixmix', 'global_size': SIZE, 'pixmix_dir': missing})
    unreadable = tmp_path / 'unreadable'
    unreadable.mkdir()
    (unreadable / 'broken.jpg').write_bytes(b'not a jpeg')
    (unreadable / 'readme.txt').write_text('no pictures here')
    with pytest.raises(ValueError, match='unreadable.*no readable image'):
        pipelines.build({'name': 'pixmix', 'global_size': SIZE, 'pixmix_dir': str(unreadable)})


def test_pixmix_default_is_cached_fractals(tmp_path, record, monkeypatch):
    cache = str(tmp_path / 'cache')
    config = {'name': 'pixmix', 'global_size': SIZE, 'pixmix_dir': '', 'pixmix_cache_dir': cache,
              'pixmix_num_fractals': 3}
    first = pipelines.build(config)
    assert first.mixing.images.shape == (3, 37, 37, 3)
    assert os.listdir(cache) == [os.path.basename(fractals.cache_path(cache, 3, 37, 0))]

    def fail(*args, **kwargs):
        raise AssertionError('the cache should have been read')

    monkeypatch.setattr(fractals, 'generate', fail)
    second = pipelines.build(config)
    np.testing.assert_array_equal(first.mixing.images, second.mixing.images)
    np.testing.assert_array_equal(_run(first, record, 1)['global'],
                                  _run(second, record, 1)['global'])


# --- Fractals ---------------------------------------------------------------------------------

def test_fractals_are_deterministic_and_distinct():
    images = fractals.generate(4, 48, seed=0)
    assert images.shape == (4, 48, 48, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, fractals.generate(4, 48, seed=0))
    np.testing.assert_array_equal(images[:2], fractals.generate(2, 48, seed=0))
    assert not np.array_equal(images, fractals.generate(4, 48, seed=1))
    for image in images:
        coverage = (image.max(-1) > 0).mean()
        assert 0.03 <= coverage < 0.95 and image.std() > 10
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # coloured, not one flat tone
    for i in range(4):
        for j in range(i):
            assert np.abs(images[i].astype(int) - images[j]).mean() > 5


def test_fractal_cache_survives_a_corrupt_file(tmp_path):
    cache = str(tmp_path)
    path = fractals.cache_path(cache, 2, 24, 5)
    with open(path, 'wb') as f:
        f.write(b'garbage')
    images = fractals.load_or_generate(cache, 2, 24, seed=5)
    np.testing.assert_array_equal(images, fractals.generate(2, 24, seed=5))
    np.testing.assert_array_equal(np.load(path), images)
    np.testing.assert_array_equal(fractals.load_or_generate('', 2, 24, seed=5), images)
    with pytest.raises(ValueError):
        fractals.generate(0, 24)


# --- build ------------------------------------------------------------------------------------

def test_build_rejects_unknown_names():
    for bad in ({'name': 'randaugment'}, {}):
        with pytest.raises(ValueError, match='multicrop') as e:
            pipelines.build(bad)
        assert all(name in str(e.value) for name in config_lib.AUGMENTATIONS)


def test_build_from_config_dict(fractal_cache, record):
    for name in config_lib.AUGMENTATIONS:
        config = ml_collections.ConfigDict(_config(name, fractal_cache))
        transform = pipelines.build(config)
        assert isinstance(transform, grain.transforms.RandomMap)
    built = pipelines.build(ml_collections.ConfigDict(
        _config('multicrop', fractal_cache, flip_p=0.25)))
    assert isinstance(built, multicrop.MultiCrop)
    assert built.global_scale == (0.25, 1.0) and built.flip_p == 0.25
    default = pipelines.build({'name': 'multicrop', 'global_size': SIZE, 'local_size': 16,
                             'num_local': 2, 'pixmix_dir': '/does/not/matter'})
    assert _run(default, record, 0)['local'].shape == (2, 16, 16, 3)


def test_in_a_grain_pipeline(all_pipelines, record):
    def images(seed):
        ds = grain.MapDataset.source([record] * 4).random_map(all_pipelines['augmix'], seed=seed)
        return np.stack([x['global'] for x in ds])

    np.testing.assert_array_equal(images(0), images(0))
    assert not np.array_equal(images(0), images(1))
    assert len({x.tobytes() for x in images(0)}) == 4  # each element gets its own randomness


def test_transforms_pickle(all_pipelines, record, tmp_path, fractal_cache):
    # grain's worker processes receive the transforms pickled.
    folder = str(tmp_path / 'mixing')
    _write_pictures(folder, [(0, 128, 255)])
    folder_pixmix = pipelines.build(_config('pixmix', fractal_cache, pixmix_dir=folder))
    for transform in [*all_pipelines.values(), folder_pixmix]:
        copy = pickle.loads(pickle.dumps(transform))
        np.testing.assert_array_equal(_run(copy, record, 2)['global'],
                                      _run(transform, record, 2)['global'])
