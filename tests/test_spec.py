"""The numbers of docs/paper.md sections 3-6 ("Section N" below), each read from where the
code uses it.

One test (or parametrized case) per number that no other test already pins by behaviour; the
others are listed, with the test that pins them, in docs/fidelity.md. Expected values are typed
here from docs/paper.md, never read back from the code: each test fails if the number changes
in the config defaults or in the code that applies it. Everything runs on stubs, tiny images or
the optimizer alone, so the file takes seconds.
"""
import functools
import math

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from sdtl_jax import config_lib, evaluate, metrics_io, models, optim, train
from sdtl_jax.data import records
from sdtl_jax.data.augment import eval_view, multicrop, normalize, photometric, pipelines
from sdtl_jax.datasets import imagenet100, pets

# --- Section 3: the cosine classifier -----------------------------------------------------------


def _stub_layers(model, features):
    """Runs `model` with every layer but the classifier replaced by `features[name]` (or
    `features['default']`): the real head, on features we know, at no compile cost."""
    stubbed = set(model.layer_names()) - {'head'}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name == '__call__' and module.name in stubbed
                and isinstance(module.parent, type(model))):
            return features.get(module.name, features['default'])
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)


def _l2(x, axis):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


@pytest.mark.parametrize('name', ['resnet50', 'tinyvit_5m'])
def test_cosine_classifier_temperature_is_0_1(name):
    """Section 3: logits = cos(feature, class weight) / tau, tau = 0.1, in the models as built."""
    model = models.build({'name': name}, num_classes=7)
    rng = np.random.default_rng(0)
    nhwc = rng.normal(size=(3, 2, 2, 16)).astype(np.float32)    # ResNet's head pools these
    pooled = rng.normal(size=(3, 16)).astype(np.float32)        # TinyViT's final norm output
    with _stub_layers(model, {'default': jnp.asarray(nhwc), 'norm': jnp.asarray(pooled)}):
        (logits, _), variables = model.init_with_output(
            jax.random.key(0), jnp.zeros((3, 32, 32, 3)), train=False)
    kernel = np.asarray(variables['params']['head']['kernel'])
    feature = nhwc.mean(axis=(1, 2)) if name == 'resnet50' else pooled
    cosine = _l2(feature, -1) @ _l2(kernel, 0)
    np.testing.assert_allclose(np.asarray(logits), cosine / 0.1, rtol=1e-5, atol=1e-6)


# --- Section 4: the training recipe -------------------------------------------------------------

PAPER = {  # Section 4 and 8: global batch per setting and the real training set's size
    'imagenet100': dict(global_batch=64, num_train=126_689),
    'pets': dict(global_batch=32, num_train=3_680),
}


def _paper_config(data):
    c = config_lib.base(data=data)
    c.transfer.num_frozen = 0
    return c


def _first_update(config, params, layer_names):
    """The optimizer's first update for zero gradients, no warm-up: only weight decay moves."""
    tx, lr_fn = optim.make(config, params, layer_names, warmup_steps=0, total_steps=1000)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return updates, float(lr_fn(0))


def test_weight_decay_is_1e_4():
    """Section 4: weight decay 1e-4, PyTorch-style (added to the gradient before momentum)."""
    params = {'head': {'kernel': jnp.full((4, 3), 3.0)}}
    updates, lr = _first_update(_paper_config('imagenet100'), params, ('head',))
    np.testing.assert_allclose(updates['head']['kernel'], -lr * 1e-4 * 3.0, rtol=1e-6)


@pytest.mark.parametrize('name, num_classes', [('resnet50', 100), ('tinyvit_5m', 37)])
def test_weight_decay_only_on_multi_dimensional_weights(name, num_classes):
    """Section 4: decay on weights with more than one dimension only: conv/linear kernels and the
    classifier's; no biases, no BN/LN scale or bias, no TinyViT attention biases. Read from the
    optimizer's actual update on the model's own parameter tree (small width, same layers)."""
    model = models.build({'name': name, **config_lib.SMALL_MODELS[name]},
                         num_classes=num_classes)
    shapes = jax.eval_shape(lambda: models.init(model, 0, 32))['params']
    # Each leaf as 2 x ... x 2 with its own rank: the rule depends on names and ranks only, and
    # a few distinct shapes keep the eager update cheap.
    params = jax.tree.map(lambda s: jnp.full((2,) * len(s.shape), 3.0, s.dtype), shapes)
    updates, _ = _first_update(_paper_config('imagenet100'), params, model.layer_names())
    decayed, kept = set(), set()
    for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
        keys = tuple(p.key for p in path)
        (decayed if np.any(np.asarray(update) != 0) else kept).add(keys)
    leaf_names = {keys[-1] for keys in decayed | kept}
    # Any new kind of parameter must be placed on one side of section 4's rule, here.
    expected_names = {'kernel', 'scale', 'bias'} | (
        {'attention_biases'} if name == 'tinyvit_5m' else set())
    assert leaf_names == expected_names
    assert {keys[-1] for keys in decayed} == {'kernel'}
    assert ('head', 'kernel') in decayed                          # the cosine classifier
    assert all(keys[-1] != 'kernel' for keys in kept)             # every kernel decays
    # BN (ResNet, TinyViT) and LN (TinyViT) parameters, linear biases, attention biases: kept.
    assert any(keys[-2].startswith('bn') for keys in kept)
    if name == 'tinyvit_5m':
        assert ('norm', 'scale') in kept and ('norm', 'bias') in kept
        assert any(keys[-2:] == ('qkv', 'bias') for keys in kept)
        assert any(keys[-1] == 'attention_biases' for keys in kept)


def _lr_points(global_batch, num_train):
    """Section 4: (iteration, lr) at iterations 0, 1, mid-warm-up, end of warm-up, mid-cosine,
    last; per-iteration linear warm-up from 0 over 10 of 100 epochs, then
    lr(i) = 1e-6 + 0.5 (base - 1e-6)(1 + cos(pi i / i_max)), base = 0.1 x batch / 256."""
    base, end = 0.1 * global_batch / 256, 1e-6
    per_epoch = num_train // global_batch           # the last partial batch is dropped
    warmup, total = 10 * per_epoch, 100 * per_epoch

    def cosine(step):
        return end + 0.5 * (base - end) * (1 + math.cos(math.pi * (step - warmup)
                                                        / (total - warmup)))

    return {
        'iteration_0': (0, 0.0),
        'iteration_1': (1, base / warmup),           # per iteration, not per epoch
        'mid_warmup': (warmup // 2, base * (warmup // 2) / warmup),
        'end_of_warmup': (warmup, base),
        'mid_cosine': (warmup + (total - warmup) // 2, cosine(warmup + (total - warmup) // 2)),
        'last': (total - 1, cosine(total - 1)),
    }


@pytest.mark.parametrize('data', sorted(PAPER))
@pytest.mark.parametrize('point', ['iteration_0', 'iteration_1', 'mid_warmup', 'end_of_warmup',
                                   'mid_cosine', 'last'])
def test_learning_rate_schedule(data, point):
    """Section 4: the schedule `optim.make` builds from the paper's config and dataset size."""
    c = _paper_config(data)
    steps = config_lib.steps(c, PAPER[data]['num_train'])
    _, lr_fn = optim.make(c, {'head': {'kernel': jnp.ones((2, 2))}}, ('head',),
                          warmup_steps=steps.warmup, total_steps=steps.total)
    step, expected = _lr_points(**PAPER[data])[point]
    # float32 cancellation: optax's warm-up computes base (1 - (1 - i / W)), and 1 + cos(x)
    # near x = pi is exact to ~6e-8: both leave ~1e-3 relative error on lr(1) and on the last lr.
    rel = 2e-3 if point in ('iteration_1', 'last') else 1e-5
    assert float(lr_fn(step)) == pytest.approx(expected, rel=rel, abs=1e-12)


def test_first_updates_follow_the_warmup():
    """Section 4: the optimizer's real steps use the warm-up: nothing moves at iteration 0, then
    lr(1) = base / warm-up steps times the momentum buffer (g + 0.9 g)."""
    c = _paper_config('imagenet100')
    steps = config_lib.steps(c, PAPER['imagenet100']['num_train'])
    params = {'head': {'bias': jnp.zeros(3)}}                     # 1-D: no weight decay
    tx, _ = optim.make(c, params, ('head',), warmup_steps=steps.warmup, total_steps=steps.total)
    state, grads = tx.init(params), {'head': {'bias': jnp.ones(3)}}
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(grads, state, params)
    np.testing.assert_array_equal(first['head']['bias'], 0.0)
    np.testing.assert_allclose(second['head']['bias'], -(0.1 * 64 / 256) / (10 * 1979) * 1.9,
                               rtol=2e-3)    # float32 warm-up, see test_learning_rate_schedule


def test_global_batch_tinyvit_pets_is_32():
    """Section 4: global batch 32 for TinyViT-5M / Pets (64 for ResNet-50: test_config.py)."""
    c = config_lib.base(data='pets')
    assert c.model.name == 'tinyvit_5m'
    assert config_lib.steps(c, 3_680).per_epoch == 3_680 // 32
    assert config_lib.steps(c, 3_679).per_epoch == 3_679 // 32     # partial batch dropped


# --- Section 5: multi-crop ----------------------------------------------------------------------

NUM_DRAWS = 1000         # images through the full multi-crop
NUM_EXTRA_GLOBAL = 4000  # and through a global-only one, for tighter global probabilities
CROPS_PER_IMAGE = 9   # Section 5: 1 global + 8 local


def _record(image):
    return {'image': image, 'label': 3, 'id': 'spec/0'}


def _paper_multicrop(**sizes):
    aug = _paper_config('imagenet100').aug.to_dict()
    aug.update(sizes)
    return pipelines.build(aug)


def test_multicrop_counts_and_sizes():
    """Section 5: 1 global crop of 224 and 8 local crops of 96, each with the image's label."""
    photo = load_sample_images().images[0]
    out = _paper_multicrop().random_map(_record(photo), np.random.default_rng(0))
    assert out['global'].shape == (1, 224, 224, 3) and out['local'].shape == (8, 96, 96, 3)
    assert out['global_ops'].shape[0] == 1 and out['local_ops'].shape[0] == 8
    assert out['label'] == 3


@pytest.fixture(scope='module')
def draws():
    """Crops of the paper's multi-crop, with every crop box and flip recorded: NUM_DRAWS images
    through it, then NUM_EXTRA_GLOBAL through the same config with no local crops. Crops are
    shrunk to 16 / 8 px: no probability, scale or ratio depends on the output size."""
    boxes, flips = [], [0]
    box_fn, flip_fn = multicrop.random_resized_crop_box, cv2.flip

    def spy_box(height, width, scale, ratio, rng):
        box = box_fn(height, width, scale, ratio, rng)
        boxes.append((tuple(scale), tuple(ratio), box[2] * box[3] / (height * width),
                      box[3] / box[2]))
        return box

    def spy_flip(image, code):
        flips[0] += 1
        return flip_fn(image, code)

    image = _record(np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8))
    rng = np.random.default_rng(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(multicrop, 'random_resized_crop_box', spy_box)
        patch.setattr(multicrop.cv2, 'flip', spy_flip)
        transform = _paper_multicrop(global_size=16, local_size=8)
        outs = [transform.random_map(image, rng) for _ in range(NUM_DRAWS)]
        assert len(boxes) == NUM_DRAWS * CROPS_PER_IMAGE
        # Each image: its global crop first, then its local ones.
        kinds = ['global'] + ['local'] * (CROPS_PER_IMAGE - 1)
        by_kind = {k: [b for i, b in enumerate(boxes) if kinds[i % CROPS_PER_IMAGE] == k]
                   for k in ('global', 'local')}
        global_only = _paper_multicrop(global_size=16, local_size=8, num_local=0)
        extra = [global_only.random_map(image, rng) for _ in range(NUM_EXTRA_GLOBAL)]
    by_kind['global'] += boxes[NUM_DRAWS * CROPS_PER_IMAGE:]
    ops = {'global': np.concatenate([o['global_ops'] for o in outs + extra]),
           'local': np.concatenate([o['local_ops'] for o in outs])}
    return {'boxes': by_kind, 'flip_fraction': flips[0] / len(boxes), 'ops': ops}


@pytest.mark.parametrize('kind, scale', [('global', (0.25, 1.0)), ('local', (0.05, 0.25))])
def test_multicrop_scale_range(draws, kind, scale):
    """Section 5: RandomResizedCrop scale [0.25, 1] (global), [0.05, 0.25] (local): the range the
    transform passes, and the crop areas it really gets (up to rounding to whole pixels)."""
    boxes = draws['boxes'][kind]
    assert {b[0] for b in boxes} == {scale}
    areas = np.array([b[2] for b in boxes])
    lo, hi = scale
    assert areas.min() >= lo - 0.01 and areas.max() <= hi + 0.01
    assert areas.min() < lo + 0.02 and areas.max() > hi - 0.05 * (hi - lo)


@pytest.mark.parametrize('kind', ['global', 'local'])
def test_multicrop_aspect_ratio_range(draws, kind):
    """Section 5: RandomResizedCrop ratio [3/4, 4/3]."""
    boxes = draws['boxes'][kind]
    assert {b[1] for b in boxes} == {(3 / 4, 4 / 3)}
    ratios = np.array([b[3] for b in boxes])
    assert ratios.min() > 3 / 4 - 0.05 and ratios.max() < 4 / 3 + 0.05
    assert ratios.min() < 0.8 and ratios.max() > 1.25


def test_multicrop_flip_probability_is_0_5(draws):
    """Section 5: horizontal flip with p 0.5, global and local crops alike."""
    assert draws['flip_fraction'] == pytest.approx(0.5, abs=0.02)


# Section 5: (op, crop kind, probability); 5,000 global and 8,000 local draws.
PROBABILITIES = [
    ('jitter', 'global', 0.8), ('jitter', 'local', 0.8),
    ('grayscale', 'global', 0.2), ('grayscale', 'local', 0.2),
    ('blur', 'global', 0.2), ('blur', 'local', 0.5),
    ('solarize', 'global', 0.2), ('solarize', 'local', 0.0),
]
_APPLIED = {
    'jitter': lambda ops: ops[:, photometric.JITTER] > 0,
    'grayscale': lambda ops: ops[:, photometric.GRAYSCALE] > 0,
    'blur': lambda ops: ops[:, photometric.BLUR_SIGMA] > 0,
    'solarize': lambda ops: ops[:, photometric.SOLARIZE] > 0,
}


@pytest.mark.parametrize('op, kind, p', PROBABILITIES)
def test_multicrop_op_probability(draws, op, kind, p):
    """Section 5: each light op's probability per crop kind, measured on the drawn crops (about
    four standard deviations of tolerance; 0 means never)."""
    applied = _APPLIED[op](draws['ops'][kind])
    assert len(applied) == (NUM_DRAWS + NUM_EXTRA_GLOBAL if kind == 'global' else 8 * NUM_DRAWS)
    if p == 0:
        assert not applied.any()
    else:
        tolerance = 4 * math.sqrt(p * (1 - p) / len(applied))
        assert applied.mean() == pytest.approx(p, abs=tolerance)


# Section 5: ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1): factors drawn
# uniformly from [1 - s, 1 + s] (hue: [-0.1, 0.1]).
JITTER_RANGES = [('brightness', photometric.BRIGHTNESS, 0.6, 1.4),
                 ('contrast', photometric.CONTRAST, 0.6, 1.4),
                 ('saturation', photometric.SATURATION, 0.8, 1.2),
                 ('hue', photometric.HUE, -0.1, 0.1)]


@pytest.mark.parametrize('kind', ['global', 'local'])
@pytest.mark.parametrize('what, index, lo, hi', JITTER_RANGES, ids=[r[0] for r in JITTER_RANGES])
def test_color_jitter_strength(draws, kind, what, index, lo, hi):
    """Section 5: the jitter factors of the jittered crops span [lo, hi], uniformly."""
    ops = draws['ops'][kind]
    factors = ops[ops[:, photometric.JITTER] > 0, index]
    span = hi - lo
    assert factors.min() >= lo - 1e-6 and factors.max() <= hi + 1e-6
    assert factors.min() < lo + 0.02 * span and factors.max() > hi - 0.02 * span
    # Uniform: as many draws in the lower half as in the upper (4 standard deviations).
    assert np.mean(factors < (lo + hi) / 2) == pytest.approx(0.5,
                                                             abs=2 / math.sqrt(len(factors)))


@pytest.mark.parametrize('kind', ['global', 'local'])
def test_color_jitter_random_order(draws, kind):
    """Section 5: the four jitter ops in a random order: every one of the 24 orders occurs, about
    equally often."""
    ops = draws['ops'][kind]
    orders = ops[ops[:, photometric.JITTER] > 0][:, photometric.ORDER].astype(int)
    counts = np.unique(orders, axis=0, return_counts=True)[1]
    assert len(counts) == 24
    assert counts.min() > 0.5 * len(orders) / 24 and counts.max() < 1.5 * len(orders) / 24


@pytest.mark.parametrize('kind', ['global', 'local'])
def test_blur_radius_range(draws, kind):
    """Section 5: Gaussian blur radius U(0.1, 2) (PIL's radius is the Gaussian's std)."""
    sigmas = draws['ops'][kind][:, photometric.BLUR_SIGMA]
    sigmas = sigmas[sigmas > 0]
    assert sigmas.min() >= 0.1 - 1e-6 and sigmas.max() <= 2.0 + 1e-6
    assert sigmas.min() < 0.15 and sigmas.max() > 1.95


def test_normalisation_uses_imagenet_mean_and_std():
    """Section 5: normalise with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)."""
    pixels = np.array([[0, 0, 0], [255, 255, 255], [124, 116, 104], [10, 200, 77]], np.uint8)
    want = (pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(normalize.normalize(pixels), want, rtol=1e-6, atol=1e-6)


class _RecordingModel:
    """Stands in for a model in `train.train_step`: records every forward pass, and leaves a
    trace in the BN statistics (x 10 + 1 for a 224 px pass, + 2 for a 96 px one)."""

    def __init__(self):
        self.passes = []

    def apply(self, variables, images, *, train, mutable):
        self.passes.append((images.shape, train, mutable))
        stats = variables['batch_stats']['trace']
        code = {224: 1, 96: 2}[images.shape[1]]
        logits = jnp.mean(images, axis=(1, 2)) @ variables['params']['w']
        return (logits, {}), {'batch_stats': {'trace': stats * 10 + code}}


def test_two_forward_passes_per_step_global_then_local():
    """Section 5: the model runs twice per step, on the global crops (224) and then on all local
    crops (96), in train mode, and each pass updates the BN statistics the previous one left.
    (test_train_step.py checks the same against a real BatchNorm network.)"""
    model, b = _RecordingModel(), 2
    params = {'w': jnp.ones((3, 5))}
    tx = optax.sgd(0.1)
    state = train.initial_state(params, {'trace': jnp.float32(0)}, tx, jax.random.key(0))
    batch = {'global': np.zeros((b, 1, 224, 224, 3), np.uint8),
             'local': np.zeros((b, 8, 96, 96, 3), np.uint8),
             'label': np.zeros((b,), np.int32)}
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                     lr_fn=lambda step: 0.1, dtype=jnp.float32))
    new_state, _ = step(state, batch)
    assert [shape for shape, _, _ in model.passes] == [(b * 1, 224, 224, 3), (b * 8, 96, 96, 3)]
    assert all(is_train and 'batch_stats' in mutable for _, is_train, mutable in model.passes)
    assert float(new_state.batch_stats['trace']) == 12.0      # global (1), then local (2)


# --- Section 6: evaluation ----------------------------------------------------------------------

@pytest.mark.parametrize('orientation', ['landscape', 'portrait'])
def test_eval_resize_256_bilinear_centre_crop_224(orientation):
    """Section 6: shorter side to 256 (bilinear), centre crop 224, with the config's values."""
    photo = load_sample_images().images[1]                            # 427 x 640
    if orientation == 'portrait':
        photo = np.ascontiguousarray(photo.transpose(1, 0, 2))         # 640 x 427
    c = _paper_config('imagenet100')
    out = eval_view.EvalTransform(resize=c.eval.resize, crop=c.eval.crop).map(
        {'image': records.encode_png(photo), 'label': 1, 'id': 'spec/eval'})['image']
    # torchvision Resize(256) + CenterCrop(224): 640 x 427 -> 383 x 256, crop from (80, 16).
    size, box = ((383, 256), (80, 16, 304, 240)) if orientation == 'landscape' else (
        (256, 383), (16, 80, 240, 304))
    want = Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR).crop(box)
    np.testing.assert_array_equal(out, np.asarray(want))


class _FixedLogits:
    def __init__(self, logits):
        self.logits, self.images = logits, None

    def apply(self, variables, images, *, train):
        assert not train
        self.images = images
        return self.logits, {}


def test_eval_counts_top1_and_top5_over_unpadded_images():
    """Section 6: top-1 and top-5 over the real images of a padded batch, on normalised input."""
    # The label (0) ranks 1st, 3rd, 6th, and 1st again in a padding row (mask False).
    ranks = [1, 3, 6, 1]
    logits = np.tile(np.arange(8, 0, -1, dtype=np.float32), (4, 1))   # class k ranks k + 1
    for row, rank in enumerate(ranks):
        logits[row, [0, rank - 1]] = logits[row, [rank - 1, 0]]
    model = _FixedLogits(jnp.asarray(logits))
    pixels = np.full((4, 2, 2, 3), 200, np.uint8)
    batch = {'image': pixels, 'label': np.zeros(4, np.int32),
             'mask': np.array([True, True, True, False])}
    sums = evaluate.eval_step({}, {}, batch, model=model, dtype=jnp.float32)
    assert {k: int(v) for k, v in sums.items()} == {'top1': 1, 'top5': 2, 'count': 3}
    np.testing.assert_allclose(model.images, normalize.normalize(pixels), rtol=1e-6)


def test_results_are_mean_and_std_over_the_last_5_evaluations():
    """Section 6: mean and standard deviation over the last 5 evaluations (the config's
    eval.last_epochs), as the paper reports; std is the population std (docs/fidelity.md)."""
    c = _paper_config('imagenet100')
    top1 = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0]
    history = [{'epoch': e, 'top1': t, 'top5': t + 1, 'train_loss': 1.0}
               for e, t in enumerate(top1)]
    out = metrics_io.summarize(history, c.eval.last_epochs)
    assert out['num_evals'] == 5
    assert out['top1_mean'] == pytest.approx(np.mean(top1[-5:]))
    assert out['top1_std'] == pytest.approx(np.std(top1[-5:]))
    assert out['top5_mean'] == pytest.approx(np.mean(top1[-5:]) + 1)



@pytest.mark.parametrize('module, split, count', [
    (imagenet100, 'val', 5_000), (pets, 'test', 3_669), (pets, 'train', 3_680),
])
def test_split_sizes_the_importers_expect(module, split, count):
    """Section 6 and 8: ImageNet-100 val has 5,000 images, Pets test 3,669 and trainval 3,680; the
    importers warn when an imported split has another size (test_importers.py checks the
    warning, and ImageNet-100's 126,689 training images)."""
    assert module.EXPECTED[split] == count
