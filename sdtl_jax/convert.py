r"""Imports PyTorch weights into an Orbax checkpoint that `transfer.init_from` accepts.

  python -m sdtl_jax.convert --model=resnet50 --checkpoint=resnet50-11ad3fa6.pth --out=runs/rn50
  python -m sdtl_jax.convert --model=tinyvit_5m --checkpoint=model.safetensors --out=runs/tv5m_in1k
  python -m sdtl_jax.main --config=configs/synth_to_real.py:model=tinyvit_5m,data=pets \
      --config.transfer.init_from=runs/tv5m_in1k --workdir=runs/tv5m_pets

Sources: torchvision ResNet-50 state dicts, and TinyViT-5M checkpoints in timm's layout or in
Microsoft's original one (`{'model': state_dict}`, `layers.*`, `Conv2d_BN.c`, `norm_head`),
as `.pth` (needs torch) or `.safetensors`. Every tensor is mapped by name; a tensor missing,
left over or of the wrong shape stops the conversion with a list naming each one.

Written to `<out>/checkpoints/0/state`: `{'params', 'batch_stats'}`, the layout
`checkpointing.load_variables` reads, and `<out>/convert.json` (source, model config, head,
dropped tensors). The classifier (our layer 17, `head`) is a bias-free cosine classifier
(docs/paper.md §3):
- by default the checkpoint's classifier is dropped: a transfer re-initialises layers >= N;
- `--num_classes=K` adds a freshly initialised K-class head, so that every layer can be taken
  over (`transfer.reinit=False` fine-tunes the whole converted model);
- `--keep_classifier` keeps the linear classifier's weight as the cosine classifier's class
  vectors and drops its bias, which a cosine classifier cannot hold; the kept head is a starting
  point, not the same classifier (its logits are cosines over tau, not w.x + b).
docs/convert.md has the hub routes (torchvision's URL, `huggingface_hub.hf_hub_download`).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import os
import pickle
import re
import sys
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import traverse_util

from sdtl_jax import cli, fileio, models
from sdtl_jax.models import layers

# The reference's linear classifier, whose weight is our `head` kernel.
CLASSIFIER = {'resnet50': 'fc', 'tinyvit_5m': 'head.fc'}
# Buffers PyTorch saves that have no Flax counterpart: BatchNorm's update counter (Flax uses a
# fixed momentum) and old TinyViT checkpoints' bias index table (recomputed from the window).
IGNORED_BUFFERS = ('num_batches_tracked', 'attention_bias_idxs')
# Our leaf name -> the reference's (params and batch_stats; the names do not clash).
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
           'var': 'running_var', 'attention_biases': 'attention_biases'}
# torchvision's shortcut is a Sequential; our Bottleneck names its two modules.
_MODULES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}
_TINYVIT_LAYERS = ((r'stage0_mbconv(\d+)', r'stages.0.blocks.\1'),
                   (r'stage(\d)_downsample', r'stages.\1.downsample'),
                   (r'stage(\d)_block(\d+)', r'stages.\1.blocks.\2'),
                   (r'patch_embed', 'patch_embed'), (r'norm', 'head.norm'), (r'head', 'head.fc'))
# Microsoft's TinyViT names -> timm's (timm's own checkpoint_filter_fn only unwraps `model`:
# timm's hub weights are already renamed). Microsoft's stage i ends with the downsampling that
# timm puts at the start of stage i + 1.
_MICROSOFT_RENAMES = (
    (r'^patch_embed\.seq\.0\.', 'patch_embed.conv1.'),
    (r'^patch_embed\.seq\.2\.', 'patch_embed.conv2.'),
    (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'^layers\.(\d+)\.downsample\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.'),
    (r'\.c\.weight$', '.conv.weight'),            # Conv2d_BN's convolution is called `c`
    (r'^norm_head\.', 'head.norm.'),
    (r'^head\.(weight|bias)$', r'head.fc.\1'),
)


class ConversionError(ValueError):
    """The checkpoint does not fit the model: tensors missing, left over or mis-shaped."""


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` or a torch (`.pth`, `.bin`) checkpoint into float32 NumPy arrays.

    A `.pth` may wrap the state dict in `model` (Microsoft's TinyViT) or `state_dict`;
    Microsoft's TinyViT names are renamed to timm's.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'No checkpoint file at {path!r}')
    if path.endswith('.safetensors'):
        try:
            import safetensors.numpy
        except ImportError as e:
            raise ImportError(f'Reading {path} needs safetensors (pip install safetensors)') from e
        try:
            state = safetensors.numpy.load_file(path)
        except TypeError as e:   # e.g. bfloat16, which NumPy has no name for
            raise ConversionError(f'{path}: {e}; save it with float32 tensors first') from e
    else:
        state = _load_torch(path)
    return from_microsoft_layout(
        {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
         for k, v in state.items()})


def _load_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f'Reading {path} needs torch (pip install torch), or convert it to '
                          '.safetensors') from e
    try:
        # weights_only: a checkpoint is data; never run code from a pickle.
        state = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f'{path} holds more than tensors ({e}). If you trust it, re-save its state dict: '
            "torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth')") from e
    for wrapper in ('model', 'state_dict'):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}


def from_microsoft_layout(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames a Microsoft TinyViT state dict to timm's names; a timm one is returned as is."""
    if not any(k.startswith(('layers.', 'norm_head.')) for k in state):
        return dict(state)
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in _MICROSOFT_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def reference_prefix(model: nn.Module, layer: str) -> str:
    """The reference module that holds our layer `layer` ('' for ResNet's stem, whose conv1
    and bn1 sit at the top of torchvision's model)."""
    if isinstance(model, models.resnet.ResNet):
        if layer in ('stem', 'head'):
            return {'stem': '', 'head': 'fc'}[layer]
        block = int(layer.removeprefix('block'))
        starts = list(itertools.accumulate(model.stage_sizes, initial=0))
        stage = bisect.bisect_right(starts, block) - 1
        return f'layer{stage + 1}.{block - starts[stage]}'
    for pattern, replacement in _TINYVIT_LAYERS:
        if re.fullmatch(pattern, layer):
            return re.sub(pattern, replacement, layer)
    raise ValueError(f'No reference module for layer {layer!r}')


def _reference_name(model: nn.Module, path: tuple[str, ...]) -> str:
    """('block03', 'downsample_conv', 'kernel') -> 'layer2.0.downsample.0.weight'."""
    parts = [reference_prefix(model, path[0]), *(_MODULES.get(p, p) for p in path[1:-1]),
             _LEAVES[path[-1]]]
    return '.'.join(p for p in parts if p)


def _to_flax_layout(tensor: np.ndarray, leaf: str) -> np.ndarray:
    """Kernels: conv OIHW -> HWIO (depthwise (C, 1, k, k) -> (k, k, 1, C)), linear (out, in) ->
    (in, out). Everything else (vectors, TinyViT's (heads, offsets) bias tables) stays."""
    if leaf != 'kernel':
        return tensor
    return tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T


def _shapes(model: nn.Module) -> dict:
    # Shapes only, no real initialisation (a full-size init compiles for ~20 s on a CPU).
    return jax.eval_shape(functools.partial(models.init, model, 0, 32))


def to_flax(state: Mapping[str, np.ndarray], model: nn.Module, *,
            keep_classifier: bool = False) -> tuple[dict, list[str]]:
    """Maps a reference state dict onto `model`'s variables, tensor by tensor.

    Args:
      state: torchvision ResNet or timm TinyViT names, as `load_state_dict` returns them.
      model: from `models.build`; its widths must be the checkpoint's.
      keep_classifier: map the classifier's weight to `head` (its bias is dropped); otherwise
        the classifier is dropped and the variables have no `head`.

    Returns:
      ({'params': ..., 'batch_stats': ...} as NumPy trees, names of the dropped tensors).

    Raises:
      ConversionError: naming every tensor that is missing, left over or of the wrong shape.
    """
    name = 'resnet50' if isinstance(model, models.resnet.ResNet) else 'tinyvit_5m'
    classifier = CLASSIFIER[name]
    dropped = [f'{classifier}.bias'] if f'{classifier}.bias' in state else []
    if not keep_classifier and f'{classifier}.weight' in state:
        dropped.insert(0, f'{classifier}.weight')
    used, problems = set(dropped), []
    variables = {}
    for collection, tree in _shapes(model).items():
        flat = {}
        for path, shape in traverse_util.flatten_dict(tree).items():
            if path[0] == 'head' and not keep_classifier:
                continue
            key = _reference_name(model, path)
            if key not in state:
                problems.append(f'missing: {key} (for {collection}/{"/".join(path)}, shape '
                                f'{shape.shape})')
                continue
            used.add(key)
            value = _to_flax_layout(state[key], path[-1])
            if value.shape != shape.shape:
                layout = f', {value.shape} in Flax layout' if value.ndim > 1 else ''
                problems.append(f'wrong shape: {key} {state[key].shape}{layout}; '
                                f'{collection}/{"/".join(path)} needs {shape.shape}')
            flat[path] = np.ascontiguousarray(value)
        variables[collection] = traverse_util.unflatten_dict(flat)
    problems += [f'left over: {k} {np.shape(v)}' for k, v in state.items()
                 if k not in used and k.rsplit('.', 1)[-1] not in IGNORED_BUFFERS]
    if problems:
        raise ConversionError(
            f'The checkpoint does not fit {name} {_describe(model)} ({len(problems)} '
            'problems); check --model and --model_kwargs (the widths) against it:\n  '
            + '\n  '.join(problems))
    return variables, dropped


def _describe(model: nn.Module) -> str:
    if isinstance(model, models.resnet.ResNet):
        return f'(width {model.width})'
    return f'(embed_dims {tuple(model.embed_dims)}, num_heads {tuple(model.num_heads)})'


def fresh_head(model: nn.Module, num_classes: int, seed: int = 0) -> dict:
    """A newly initialised `head` for `model`: both models' head is layers.CosineClassifier,
    whose parameters depend only on the feature width and the class count."""
    width = _shapes(model)['params']['head']['kernel'].shape[0]
    head = layers.CosineClassifier(num_classes, model.tau)
    params = head.init(jax.random.PRNGKey(seed), jnp.zeros((1, width)))['params']
    return jax.tree.map(np.asarray, params)


def write_checkpoint(out: str, variables: Mapping[str, Any]) -> str:
    """Writes `variables` as `<out>/checkpoints/0/state`, the layout `load_variables` reads."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.path.join(out, 'checkpoints'))   # Orbax wants absolute paths
    if os.path.isdir(directory) and os.listdir(directory):
        raise FileExistsError(f'{directory} already holds checkpoints; delete it or choose '
                              'another --out')
    manager = ocp.CheckpointManager(directory, item_names=('state',),
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(dict(variables))))
    manager.wait_until_finished()
    manager.close()
    return directory


def convert(checkpoint: str, out: str, *, model_config: Mapping[str, Any],
            num_classes: int | None = None, keep_classifier: bool = False) -> dict[str, Any]:
    """Converts `checkpoint` for `model_config` (`{'name': ..., **widths}`) into `out`.

    Args:
      checkpoint: a `.pth` or `.safetensors` file.
      out: the folder to write; pass it as `transfer.init_from`.
      model_config: as in the training config; the widths must be the checkpoint's.
      num_classes: add a fresh cosine head with this many classes (seed 0).
      keep_classifier: keep the checkpoint's classifier weight as the head (bias dropped).

    Returns:
      The summary written to `<out>/convert.json`.
    """
    if num_classes is not None and keep_classifier:
        raise ValueError('Give num_classes (a fresh head) or keep_classifier, not both')
    if num_classes is not None and num_classes < 1:
        raise ValueError(f'num_classes must be at least 1, got {num_classes}')
    config = dict(model_config)
    if config.get('name') not in CLASSIFIER:
        raise ValueError(f'Unknown model {config.get("name")!r}; allowed: {sorted(CLASSIFIER)}')
    state = load_state_dict(checkpoint)
    classifier = f'{CLASSIFIER[config["name"]]}.weight'
    if keep_classifier and classifier not in state:
        raise ConversionError(f'{checkpoint} has no classifier weight {classifier} to keep')
    # The class count only shapes the head, which is dropped unless kept or fresh.
    classes = num_classes or (state[classifier].shape[0] if keep_classifier else 1)
    model = models.build(config, num_classes=classes)
    variables, dropped = to_flax(state, model, keep_classifier=keep_classifier)
    if num_classes is not None:
        variables['params']['head'] = fresh_head(model, num_classes)
    directory = write_checkpoint(out, variables)
    if keep_classifier:
        head = f'kept, {classes} classes'
    else:
        head = 'dropped' if num_classes is None else f'fresh, {num_classes} classes'
    summary = {'checkpoint': os.path.abspath(checkpoint), 'model': config, 'head': head,
               'dropped': dropped, 'written': os.path.join(directory, '0')}
    fileio.write_json(os.path.join(out, 'convert.json'), summary)
    return summary


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_enum('model', None, sorted(models.MODELS), 'The architecture.', required=True,
                      flag_values=flag_values)
    flags.DEFINE_string('checkpoint', None, 'A .pth or .safetensors file.', required=True,
                        flag_values=flag_values)
    flags.DEFINE_string('out', None, 'Output folder (for transfer.init_from).', required=True,
                        flag_values=flag_values)
    flags.DEFINE_string('model_kwargs', '{}', 'JSON widths of a reduced model, as in the '
                        'training config: \'{"width": 8}\' or \'{"embed_dims": [16, 32, 40, 80], '
                        '"num_heads": [1, 2, 2, 4]}\' (default: the full-size model).',
                        flag_values=flag_values)
    flags.DEFINE_integer('num_classes', None, 'Add a fresh K-class cosine head.', lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_bool('keep_classifier', False, "Keep the classifier's weight as the cosine head "
                      '(its bias is dropped).', flag_values=flag_values)
    flags.register_validator('model_kwargs', _json_object, 'must be a JSON object, e.g. '
                             '\'{"width": 8}\'', flag_values=flag_values)
    flags.register_multi_flags_validator(
        ['num_classes', 'keep_classifier'],
        lambda f: f['num_classes'] is None or not f['keep_classifier'],
        '--num_classes (a fresh head) and --keep_classifier (the checkpoint\'s) exclude each '
        'other', flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Exit status 0, or 2 with a `convert: error:` line (a mismatch, a file missing or there)."""
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    f = flag_values
    try:
        summary = convert(f.checkpoint, f.out,
                          model_config={'name': f.model, **json.loads(f.model_kwargs)},
                          num_classes=f.num_classes, keep_classifier=f.keep_classifier)
    except (ValueError, OSError) as e:   # ConversionError, bad widths, files missing or there
        print(f'convert: error: {e}', file=sys.stderr)
        sys.exit(2)
    print(f'Wrote {summary["written"]} ({f.model}, head {summary["head"]}; dropped: '
          f'{", ".join(summary["dropped"]) or "nothing"}). Train from it with '
          f'--config.transfer.init_from={f.out}')


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
