r"""Reference outputs of torchvision's ResNet-50 and timm's TinyViT-5M for the equivalence tests.

  .venv/bin/python scripts/make_fidelity_fixtures.py              # writes tests/fixtures/fidelity/
  .venv/bin/python scripts/make_fidelity_fixtures.py --full_size  # full width: checks, no files

Needs the reference models (`SDTL_EXTRAS=reference bash scripts/setup.sh`); the tests then read
only the files written here. For each architecture the reference model, with random weights
(BatchNorm and LayerNorm statistics and affine terms, biases and TinyViT's attention-bias tables
drawn too, so that none sits at an identity value), runs in inference mode, in float64, on a
batch of 2 random images at 224 px and on their centre 96 px crop. Forward hooks record its 18
layer outputs (docs/paper.md §2). Then our model, converted from the same weights with
`sdtl_jax.convert`, runs in float32 (as the tests do) and in float64, and the largest relative
error over the layers is printed: max |ours - reference| / max |reference| per layer output.

The reference models' linear classifier is replaced by the cosine classifier of docs/paper.md
§3, written in PyTorch as t-ReX's `ClfLayer` (naver/trex, trex.py): weight (classes, features),
no bias, normalize(x) @ normalize(w).T / tau. Without it logits would not be comparable.

Reduced widths keep the fixture small (< 3 MB): torchvision's ResNet-50 with every channel count
scaled by 4 / 64 (its convolutions and BatchNorms replaced by narrower ones; the forward code is
torchvision's), and timm's TinyVit with embed_dims (16, 32, 40, 80) and num_heads (1, 2, 2, 4),
the test configs' TinyViT (config_lib.SMALL_MODELS). Layer outputs of spatial size H x W are
stored at 5 x 5 positions (rows and columns spread evenly from the first to the last, both borders
included; all positions when smaller), all channels; logits and the TinyViT norm output whole.

Files: images.npy (uint8 [2, 224, 224, 3]), <model>.safetensors (float32 weights in the
reference's names: torchvision's, timm's), <model>.npz (outputs: `<size>:<layer>`, and for
probed layers `<size>:<layer>:rows` / `:cols`), meta.json (library versions, configs, seeds).
"""

from __future__ import annotations

import json
import os
import platform

import jax
import numpy as np
import safetensors.numpy
import torch
import torch.nn.functional as F
from absl import app, flags

from sdtl_jax import cli, convert, models, torch_reference
from sdtl_jax.data.augment import normalize

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   'tests', 'fixtures', 'fidelity')
SIZES = (224, 96)
CROP = slice((224 - 96) // 2, (224 + 96) // 2)    # the 96 px input: the images' centre crop
PROBE = 5                                          # probed rows and columns per layer output
NUM_CLASSES = 10
TAU = 0.1
SEED = 0
# Our model configs; the reference is built to the same widths.
SMALL = {'resnet50': {'name': 'resnet50', 'width': 4},
         'tinyvit_5m': {'name': 'tinyvit_5m', 'embed_dims': [16, 32, 40, 80],
                        'num_heads': [1, 2, 2, 4]}}
REFERENCES = {
    'resnet50': 'torchvision.models.resnet50(weights=None), every channel count scaled by 4 / 64 '
                '(narrow()), fc replaced by CosineHead',
    'tinyvit_5m': "timm.create_model('tiny_vit_5m_224', embed_dims=(16, 32, 40, 80), "
                  'num_heads=(1, 2, 2, 4)), head.fc replaced by CosineHead',
}


class CosineHead(torch.nn.Module):
    """t-ReX's ClfLayer with tau > 0 (naver/trex, trex.py): cos(feature, class weight) / tau.

    Its parameter is `weight`, so the state dict key is the linear classifier's (`fc.weight`,
    `head.fc.weight`), which the converter maps to our head's kernel.
    """

    def __init__(self, in_features: int, num_classes: int, tau: float = TAU):
        super().__init__()
        self.tau = tau
        self.weight = torch.nn.Parameter(torch.randn(num_classes, in_features))

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t() / self.tau


def narrow(model: torch.nn.Module, width: int) -> None:
    """Scales every channel count of a torchvision ResNet-50 by width / 64, in place.

    Each Conv2d and BatchNorm2d is replaced by one with the scaled channels (the 3 image channels
    stay) and otherwise the same settings; torchvision's forward code runs unchanged.
    """
    def scale(channels):
        return channels if channels == 3 else channels * width // 64

    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Conv2d):
                setattr(module, name, torch.nn.Conv2d(
                    scale(child.in_channels), scale(child.out_channels), child.kernel_size,
                    child.stride, child.padding, child.dilation, child.groups,
                    bias=child.bias is not None))
            elif isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, name, torch.nn.BatchNorm2d(scale(child.num_features)))


def reference_model(name: str, full_size: bool, num_classes: int,
                    calibration: np.ndarray) -> torch.nn.Module:
    """The reference with random weights and our cosine head, in inference mode, float64."""
    if name == 'resnet50':
        model = torch_reference.resnet50()
        if not full_size:
            narrow(model, SMALL[name]['width'])
        model.fc = CosineHead(model.layer4[-1].conv3.out_channels, num_classes)
    else:
        widths = {} if full_size else {k: SMALL[name][k] for k in ('embed_dims', 'num_heads')}
        model = torch_reference.tinyvit_5m(**widths)
        model.head.fc = CosineHead(model.head.fc.in_features, num_classes)
    randomize(model, calibration)
    return model.double().eval()


def randomize(model: torch.nn.Module, calibration: np.ndarray) -> None:
    """Draws every weight, so that no term sits at an identity value (0 or 1) unseen.

    Conv and linear weights ~ N(0, 1 / fan_in), so that activations stay of order 1 and every
    GELU sees inputs where its exact and tanh forms differ; norm scales ~ U(0.5, 1.5), biases
    ~ N(0, 0.2), TinyViT's attention-bias tables ~ N(0, 1). BatchNorm running statistics are
    those of a calibration batch (other images than the fixture's), as after training.
    """
    with torch.no_grad():
        for key, value in model.state_dict().items():
            leaf = key.rsplit('.', 1)[-1]
            if not value.is_floating_point() or leaf.startswith('running_'):
                continue
            if leaf == 'weight' and value.ndim > 1:
                value.normal_(0, value[0].numel() ** -0.5)
            elif leaf == 'weight':                    # BatchNorm and LayerNorm scales
                value.uniform_(0.5, 1.5)
            elif leaf == 'attention_biases':
                value.normal_(0, 1)
            else:
                value.normal_(0, 0.2)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None                # a plain average over the batches seen
        model.train()
        model(torch.from_numpy(calibration.transpose(0, 3, 1, 2)))


def run_reference(model: torch.nn.Module, ours, x: np.ndarray) -> dict[str, np.ndarray]:
    """The reference's 18 layer outputs on `x` (NHWC), in our layout, recorded by hooks.

    Layer -> module as in the converter (docs/paper.md §2), except ResNet's stem, which ends
    with torchvision's top-level max-pool.
    """
    modules = dict(model.named_modules())
    outputs, hooks = {}, []
    for layer in ours.layer_names():
        module = modules['maxpool' if layer == 'stem' else convert.reference_prefix(ours, layer)]

        def hook(module, args, output, layer=layer):
            outputs[layer] = to_nhwc(module, output.detach().numpy())
        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64)))
    for h in hooks:
        h.remove()
    return outputs


def to_nhwc(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """A hooked output in our layout: NHWC feature maps, [batch, features] vectors."""
    if type(module).__name__ == 'TinyVitBlock':      # timm's blocks already return NHWC
        return x
    if x.ndim == 4 and x.shape[2:] == (1, 1):        # timm's head norm on the pooled map
        return x.reshape(x.shape[0], -1)
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def probe(x: np.ndarray) -> dict[str, np.ndarray]:
    """PROBE x PROBE positions of a feature map (all of a vector); keys '', ':rows', ':cols'."""
    if x.ndim != 4:
        return {'': x}
    rows, cols = (np.unique(np.linspace(0, n - 1, PROBE).round().astype(np.int32))
                  for n in x.shape[1:3])
    return {'': x[:, rows][:, :, cols], ':rows': rows, ':cols': cols}


def relative_error(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - reference))
                 / np.max(np.abs(reference)))


def check(ours, state, inputs, reference) -> float:
    """Converts `state` into `ours`, runs it on each input in float32, then in float64, and
    prints the errors; returns the largest float32 one.

    The float64 run tells a real difference from float32 rounding, which deep random networks
    amplify (~100x over ResNet's 16 blocks): in float64 our models match to ~1e-13.
    """
    variables, _ = convert.to_flax(state, ours, keep_classifier=True)
    worst = 0.0
    for dtype in (np.float32, np.float64):
        with jax.enable_x64(dtype == np.float64):
            model = ours.clone(dtype=dtype)
            cast = jax.tree.map(lambda v: np.asarray(v, dtype), variables)
            apply = jax.jit(lambda x: model.apply(cast, x, train=False)[1])
            for size, x in inputs.items():
                out = apply(x.astype(dtype))
                errors = {layer: relative_error(out[layer], reference[size][layer])
                          for layer in ours.layer_names()}
                layer = max(errors, key=errors.get)
                print(f'{type(ours).__name__} {size} px, {np.dtype(dtype).name}: max relative '
                      f'error {errors[layer]:.1e} ({layer}); logits {errors["head"]:.1e}')
                if dtype == np.float32:
                    worst = max(worst, errors[layer])
    return worst


def versions() -> dict[str, str]:
    # Called after torch_reference imported both (a CUDA torchvision beside a CPU torch only
    # imports through it).
    import timm
    import torchvision
    return {'torch': torch.__version__, 'torchvision': torchvision.__version__,
            'timm': timm.__version__, 'jax': jax.__version__, 'numpy': np.__version__,
            'python': platform.python_version()}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_bool('full_size', False, 'Full-width models, 1000 classes; print the errors, '
                      'write nothing.', flag_values=flag_values)
    flags.DEFINE_string('out', OUT, 'Where the fixtures go.', flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    args = flag_values

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    images, calibration = (rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
                           for _ in range(2))
    x224 = np.asarray(normalize.normalize(images))
    inputs = {224: x224, 96: x224[:, CROP, CROP]}
    num_classes = 1000 if args.full_size else NUM_CLASSES
    meta = {'script': 'scripts/make_fidelity_fixtures.py', 'seed': SEED, 'tau': TAU,
            'num_classes': num_classes, 'sizes': list(SIZES),
            'crop_96': [CROP.start, CROP.stop], 'probe': PROBE, 'models': {}}
    worst = 0.0
    for name in SMALL:
        config = {'name': name} if args.full_size else SMALL[name]
        ours = models.build(config, num_classes=num_classes)
        model = reference_model(name, args.full_size, num_classes,
                                np.array(normalize.normalize(calibration)))
        reference = {size: run_reference(model, ours, x) for size, x in inputs.items()}
        state = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                 for k, v in model.state_dict().items()}
        worst = max(worst, check(ours, state, inputs, reference))
        if args.full_size:
            continue
        os.makedirs(args.out, exist_ok=True)
        safetensors.numpy.save_file(state, os.path.join(args.out, f'{name}.safetensors'))
        outputs = {f'{size}:{layer}{suffix}': value if suffix else value.astype(np.float32)
                   for size in SIZES for layer in ours.layer_names()
                   for suffix, value in probe(reference[size][layer]).items()}
        np.savez_compressed(os.path.join(args.out, f'{name}.npz'), **outputs)
        meta['models'][name] = {'config': config, 'reference': REFERENCES[name]}
    print(f'largest relative error: {worst:.2e}')
    if not args.full_size:
        meta['versions'] = versions()
        np.save(os.path.join(args.out, 'images.npy'), images)
        with open(os.path.join(args.out, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=2)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
