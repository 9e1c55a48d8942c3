"""Config helpers shared by `configs/*.py`: argument parsing, presets, validation.

Configs stay declarative, as in big_vision; every rule of the recipe (docs/paper.md §4-6)
lives here once, and the dataset facts come from `data/sources.py`.

Departure from big_vision: durations are in epochs (`num_epochs`, `warmup_epochs`), because the
paper states its recipe in epochs and the step count depends on the dataset's size, which is
only known when the shards are opened. `steps()` converts them once, at start-up.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math

import ml_collections

from sdtl_jax import models
from sdtl_jax.data import augment, sources
from sdtl_jax.errors import UserError
from sdtl_jax.models import layers

# The paper's two settings (docs/paper.md §4 and 8) and the embedded demo data. `model` is the
# architecture the paper pairs with the dataset.
DATA_PRESETS = {
    'imagenet100': dict(real='imagenet100_real', synth='imagenet100_synth', eval_split='val',
                        model='resnet50', global_batch=64),
    'pets': dict(real='pets_real', synth='pets_synth', eval_split='test',
                 model='tinyvit_5m', global_batch=32),
    'digits': dict(real='digits_real', synth='digits_synth', eval_split='val',
                   model='resnet50', global_batch=64),
}

# Small variants with the same 18-layer structure, for the demo and the tests.
SMALL_MODELS = {
    'resnet50': dict(width=8),
    'tinyvit_5m': dict(embed_dims=(16, 32, 40, 80), num_heads=(1, 2, 2, 4)),
}
MODELS = tuple(SMALL_MODELS)
DTYPES = ('auto', 'float32', 'bfloat16')
AUGMENTATIONS = augment.PIPELINES
FROZEN_BN = layers.FROZEN_BN
IF_CONFIG_CHANGED = ('stop', 'move_aside')
NUM_LAYERS = layers.NUM_LAYERS


class ConfigError(UserError, ValueError):
    """A config value that cannot run: names the key, the value and what is allowed. A
    ValueError too, for the callers that catch config errors as ValueError."""


class ConfigArgumentError(UserError):
    """A bad `:arg` of a config file (`--config=configs/X.py:arg`). Not a ValueError:
    ml_collections and absl turn those into a flag error holding the traceback as text, which
    absl prints; this one reaches `main.parse_flags`, which prints it as one line."""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses big_vision-style `key=value,flag` strings against typed defaults.

    A bare word sets a boolean default to True (`demo`, `smoke`). Unknown keys are errors
    (ConfigArgumentError), so a typo in `--config=...:num_frozn=4` never runs the wrong
    experiment.
    """
    parsed = dict(defaults)
    for item in filter(None, (arg or '').split(',')):
        key, sep, value = item.partition('=')
        key = key.strip()
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f'did you mean {close[0]!r}? ' if close else ''
            raise ConfigArgumentError(f'Unknown config argument {key!r}; {hint}allowed: '
                                      f'{_argument_usage(defaults)}')
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ConfigArgumentError(f'Config argument {key!r} needs a value ({key}=...)')
            parsed[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ('true', 'false', '1', '0'):
                raise ConfigArgumentError(f'Config argument {key}={value!r}: expected true or '
                                          'false')
            parsed[key] = value.lower() in ('true', '1')
        else:
            try:
                parsed[key] = type(default)(value)
            except ValueError:
                raise ConfigArgumentError(f'Config argument {key}={value!r}: expected '
                                          f'{type(default).__name__}') from None
    return ml_collections.ConfigDict(parsed)


def _argument_usage(defaults: dict) -> str:
    """'data=..., demo, ...': how each argument is written, flags bare."""
    return ', '.join(key if isinstance(defaults[key], bool) else f'{key}=...'
                     for key in sorted(defaults))


def base(*, data: str, model: str | None = None, demo: bool = False,
         smoke: bool = False) -> ml_collections.ConfigDict:
    """The paper's recipe (docs/paper.md §4-6) on `data`, shrunk for `demo` or `smoke`.

    `demo` and `smoke` run on the embedded digits data with a small model of the same
    architecture and 18 layers: the demo finishes in minutes on a 2-core CPU, the smoke
    variant runs 3 steps per stage (for tests).
    """
    if data not in DATA_PRESETS:
        raise ConfigArgumentError(f'Unknown data {data!r}; allowed: {sorted(DATA_PRESETS)}')
    preset = DATA_PRESETS['digits' if demo or smoke else data]
    model = model or DATA_PRESETS[data]['model']
    if model not in MODELS:
        raise ConfigArgumentError(f'Unknown model {model!r}; allowed: {list(MODELS)}')

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict({'name': model})
    c.dtype = 'auto'    # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU; params f32

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ''                # '' = $SDTL_DATA_DIR or ~/.cache/sdtl_jax/data
    c.data.real = preset['real']
    c.data.synth = preset['synth']
    c.data.train = preset['real']       # what this stage trains on (set by the experiment config)
    c.data.train_split = 'train'
    c.data.eval = preset['real']        # evaluation is always on real images (docs/paper.md §1)
    c.data.eval_split = preset['eval_split']
    # Loader: one worker process per CPU core (-1), 2 read threads each: measured fastest on
    # 2 cores (bench/RESULTS.md, loader_speed). 0 workers keeps decoding in this process.
    c.data.num_workers = -1
    c.data.num_threads = 2
    # Reduced training sets (Table 6): a seeded random fraction of data.train, per class if
    # stratified; applies to the stage that trains on data.train, never to a transfer's source.
    c.data.train_fraction = 1.0
    c.data.stratified = False
    c.data.max_train_examples = ml_collections.FieldReference(None, field_type=int)
    # Records that do not decode stop the run, naming shard and record; True skips them and
    # logs each to <workdir>/skipped_records.txt (counted in results.json).
    c.data.skip_corrupt = False

    # Augmentation: one of augment.PIPELINES (Table 1); DINO multi-crop (docs/paper.md §5) is
    # the recipe's. global_size is the crop of every pipeline; the rest is multi-crop's, except
    # pixmix_dir (PixMix's mixing pictures; '' = generated fractals, cached in
    # <data_dir>/pixmix_fractals).
    c.aug = ml_collections.ConfigDict()
    c.aug.name = 'multicrop'
    c.aug.pixmix_dir = ''
    c.aug.global_size = 224
    c.aug.num_global = 1
    c.aug.global_scale = (0.25, 1.0)
    c.aug.local_size = 96
    c.aug.num_local = 8
    c.aug.local_scale = (0.05, 0.25)

    # Evaluation (docs/paper.md §6): resize 256, centre-crop 224, every epoch; results are the
    # mean and std over the last `last_epochs` evaluations.
    c.eval = ml_collections.ConfigDict()
    c.eval.resize = 256
    c.eval.crop = 224
    c.eval.global_batch = 256
    c.eval.every_epochs = 1
    c.eval.last_epochs = 5

    # SGD recipe (docs/paper.md §4).
    c.num_epochs = 100
    c.warmup_epochs = 10
    c.global_batch = preset['global_batch']
    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 0.1               # per 256 images: lr = base_lr * global_batch / 256
    c.optim.end_lr = 1e-6
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4

    # Transfer (docs/paper.md §1 and 7). `source_data` empty = no transfer (a baseline).
    c.transfer = ml_collections.ConfigDict()
    c.transfer.source_data = ''
    c.transfer.init_from = ''           # a run workdir or its checkpoints/; '' = train the source
    c.transfer.num_frozen = 0
    c.transfer.frozen_bn = 'inference'  # 'adapt' lets frozen BN running statistics adapt
    c.transfer.reinit = True            # False: fine-tune the source weights of layers >= N

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_epochs = 1
    c.checkpoint.keep = 3
    c.log_every_steps = 10
    # A workdir that holds a run of another config (run_identity.NOT_IDENTITY aside): 'stop'
    # names the changed keys; 'move_aside' moves the old run into <workdir>/replaced/<time>/.
    c.if_config_changed = 'stop'

    if demo or smoke:
        # 8x8 digits: decoding is trivial, worker processes would only add start-up time.
        c.data.num_workers = 0
        c.model.update(SMALL_MODELS[model])
        c.aug.global_size, c.aug.local_size = 32, 16
        c.eval.resize, c.eval.crop = 32, 32
    if demo:
        # The digits are 8x8 pixels: a DINO local crop (5-25% of the area) keeps 2-4 of them and
        # a 25% global crop half a stroke. Measured, real-only, 12 epochs: 39% top-1 with 2 local
        # crops at 16 px, 84% with none and global crops of 60-100% (see docs/demo.md). A short
        # schedule also wants a higher LR than the paper's 100 epochs.
        c.num_epochs, c.warmup_epochs = 12, 2
        c.aug.num_local = 0
        c.aug.global_scale = (0.6, 1.0)
        c.optim.base_lr = 0.4
    if smoke:
        c.global_batch = 8
        c.eval.global_batch = 64
        c.num_epochs, c.warmup_epochs = 1, 0
        c.aug.num_local = 2
        c.eval.last_epochs = 1
        c.data.max_train_examples = 3 * c.global_batch     # 3 steps per stage
        c.log_every_steps = 1
    return c


def transfer(arg: str | None, *, source: str, target: str) -> ml_collections.ConfigDict:
    """A transfer experiment: pre-train on domain `source`, train the rest on `target`.

    `arg` takes data, model, num_frozen (default 16, the paper's data-reduction N), demo, smoke.
    """
    arg = parse_arg(arg, data='imagenet100', model='', num_frozen=16, demo=False, smoke=False)
    c = base(data=arg.data, model=arg.model or None, demo=arg.demo, smoke=arg.smoke)
    c.transfer.source_data = c.data[source]
    c.data.train = c.data[target]
    c.transfer.num_frozen = arg.num_frozen
    return c


def source_stage(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of the pre-training stage that a transfer run starts from."""
    source = config.copy_and_resolve_references()
    source.data.train = config.transfer.source_data
    source.data.train_fraction = 1.0      # Table 6 reduces the transfer's data, not the source's
    source.data.stratified = False
    source.transfer.source_data = ''
    source.transfer.init_from = ''
    source.transfer.num_frozen = 0
    source.transfer.reinit = True
    return source


def transferred_layers(config: ml_collections.ConfigDict, layer_names) -> tuple:
    """The layers a transfer stage takes over from its source: [0, N), or every layer when
    `transfer.reinit=False` fine-tunes the source weights."""
    names = tuple(layer_names)
    return names[:config.transfer.num_frozen] if config.transfer.reinit else names


def is_transfer(config: ml_collections.ConfigDict) -> bool:
    return bool(config.transfer.source_data or config.transfer.init_from)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The recipe's durations in optimizer steps, for one dataset size."""
    per_epoch: int
    total: int
    warmup: int


def steps(config: ml_collections.ConfigDict, num_train_examples: int) -> Steps:
    """Epochs -> steps for a training set of `num_train_examples` (after any subset). The
    last partial batch is dropped (docs/paper.md §4)."""
    per_epoch = num_train_examples // config.global_batch
    if per_epoch == 0:
        raise ConfigError(
            f'{num_train_examples} training example(s) of {config.data.train!r} (config.data.'
            f'train_fraction={config.data.train_fraction:g}, data.max_train_examples='
            f'{config.data.max_train_examples}) make no full batch of config.global_batch='
            f'{config.global_batch}; raise data.train_fraction or data.max_train_examples, or '
            'lower global_batch')
    return Steps(per_epoch=per_epoch, total=per_epoch * config.num_epochs,
                 warmup=per_epoch * config.warmup_epochs)


def learning_rate(config: ml_collections.ConfigDict) -> float:
    """Base LR = 0.1 x global_batch / 256 (docs/paper.md §4)."""
    return config.optim.base_lr * config.global_batch / 256


def validate(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int = 1,
             num_layers: int = NUM_LAYERS) -> None:
    """Rejects impossible configs before any compute, naming the key, the value and what is
    allowed.

    Keys and types are checked against `base()`'s (and the model's keyword arguments): a config
    file may add keys to the unlocked ConfigDict `base()` returns, ml_collections lets a bool
    through where an int is expected and leaves tuple elements unchecked, and a study's run
    configs are rebuilt from plain dicts, which carry no types.
    """
    check = functools.partial(_check, config)
    check(config.model.name in MODELS, 'model.name', list(MODELS))
    _check_section(config, _reference(config.model.name), 'config')

    check(config.seed >= 0, 'seed', '>= 0')
    check(config.dtype in DTYPES, 'dtype', list(DTYPES))
    try:    # the model's own checks (e.g. 18 layers); constructs the module, no parameters
        models.build(config.model, num_classes=1)
    except ValueError as e:
        raise ConfigError(f'config.model={config.model.to_dict()!r} is invalid: {e}') from None

    # Datasets: registry names, all with data.eval's labels. A stage trains on data.train, a
    # transfer's source stage on transfer.source_data, a study's baselines on data.real/synth.
    check(config.data.eval in sources.DATASETS, 'data.eval', sorted(sources.DATASETS))
    family = sources.get(config.data.eval).family
    real, synth = ([n for n, d in sources.DATASETS.items() if (d.family, d.domain) == (family, dom)]
                   for dom in ('real', 'synth'))
    for key, allowed in (('data.train', real + synth), ('data.real', real), ('data.synth', synth),
                         ('transfer.source_data', ['', *real, *synth])):
        check(_get(config, key) in allowed, key,
              f'{allowed} (the labels of data.eval={config.data.eval!r})')
    check(0 < config.data.train_fraction <= 1, 'data.train_fraction',
          '(0, 1], e.g. 1/2**x for x = 0..7 (Table 6)')
    check(config.data.max_train_examples is None or config.data.max_train_examples >= 1,
          'data.max_train_examples', 'None (all) or >= 1')
    check(config.data.num_workers >= -1, 'data.num_workers', '-1 (one per core), 0 or more')
    check(config.data.num_threads >= 1, 'data.num_threads', '>= 1')

    check(config.aug.name in AUGMENTATIONS, 'aug.name', list(AUGMENTATIONS))
    for key in ('aug.global_size', 'aug.local_size', 'eval.resize'):
        check(_get(config, key) >= 1, key, '>= 1 (pixels)')
    check(config.aug.num_global >= 1, 'aug.num_global', '>= 1')
    check(config.aug.num_local >= 0, 'aug.num_local', '>= 0')
    for key in ('aug.global_scale', 'aug.local_scale'):
        scale = _get(config, key)
        check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, key,
              '(low, high) with 0 < low <= high <= 1 (fractions of the image area)')
    check(1 <= config.eval.crop <= config.eval.resize, 'eval.crop',
          f'1..eval.resize ({config.eval.resize})')

    for key in ('global_batch', 'eval.global_batch'):
        check(_get(config, key) > 0 and _get(config, key) % num_devices == 0
              and _get(config, key) % num_processes == 0, key,
              f'a positive multiple of the device count ({num_devices}) and process count '
              f'({num_processes})')
    check(config.num_epochs >= 1, 'num_epochs', '>= 1')
    check(0 <= config.warmup_epochs <= config.num_epochs, 'warmup_epochs',
          f'0..num_epochs ({config.num_epochs})')
    for key in ('eval.every_epochs', 'checkpoint.every_epochs', 'checkpoint.keep',
                'log_every_steps'):
        check(_get(config, key) >= 1, key, '>= 1')
    check(1 <= config.eval.last_epochs <= config.num_epochs, 'eval.last_epochs',
          f'1..num_epochs ({config.num_epochs})')
    check(math.isfinite(config.optim.base_lr) and config.optim.base_lr > 0, 'optim.base_lr',
          '> 0')
    check(0 <= config.optim.end_lr <= learning_rate(config), 'optim.end_lr',
          f'0..the peak LR, optim.base_lr * global_batch / 256 = {learning_rate(config):g}')
    check(0 <= config.optim.momentum < 1, 'optim.momentum', '[0, 1)')
    check(math.isfinite(config.optim.weight_decay) and config.optim.weight_decay >= 0,
          'optim.weight_decay', '>= 0')

    check(0 <= config.transfer.num_frozen <= num_layers, 'transfer.num_frozen',
          f'0..{num_layers}')
    check(not config.transfer.num_frozen or is_transfer(config), 'transfer.num_frozen',
          '0 when there is no transfer.source_data or transfer.init_from')
    check(config.transfer.frozen_bn in FROZEN_BN, 'transfer.frozen_bn', list(FROZEN_BN))
    check(config.if_config_changed in IF_CONFIG_CHANGED, 'if_config_changed',
          list(IF_CONFIG_CHANGED))


def check_overrides(config: ml_collections.ConfigDict, keys) -> None:
    """Raises ConfigError for a command-line override `--config.<key>` that is not a key of
    `config`, naming the closest key and the section's keys (ml_collections raises a bare
    KeyError from inside absl's flag parser)."""
    for key in keys:
        node, section = config, 'config'
        for part in key.split('.'):
            allowed = list(node) if isinstance(node, ml_collections.ConfigDict) else []
            if part not in allowed:
                raise ConfigError(_unknown_key(section, part, allowed))
            node, section = node[part], f'{section}.{part}'


def compute_dtype(name: str, platform: str) -> str:
    """Resolves `config.dtype`: 'auto' is bfloat16 on accelerators, float32 on CPU (where
    bfloat16 is emulated and slower)."""
    if name == 'auto':
        return 'float32' if platform == 'cpu' else 'bfloat16'
    return name


def _get(config, dotted_key):
    for part in dotted_key.split('.'):
        config = config[part]
    return config


def _check(config, ok, key, allowed):
    if not ok:
        raise ConfigError(f'config.{key}={_get(config, key)!r} is invalid; allowed: {allowed}')


def _unknown_key(section: str, key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f'did you mean {section}.{close[0]}? ' if close else ''
    return (f'{section}.{key} is not a config key; {hint}allowed in {section}: '
            f'{allowed or "none, it holds a value"}')


def _reference(model: str) -> ml_collections.ConfigDict:
    """The keys and types a config may have: `base()`'s (the same for every data, model and
    variant) and, in `model`, the keyword arguments of `model` with their defaults."""
    reference = base(data='imagenet100')
    kwargs = models.model_kwargs(model)
    reference.model.update({f.name: f.default for f in dataclasses.fields(models.MODELS[model])
                            if f.name in kwargs})
    return reference


def _check_section(config, reference, section: str) -> None:
    """Every key of `config` is one of `reference`'s, holding a value of the same type."""
    for key in config:
        if key not in reference:
            raise ConfigError(_unknown_key(section, key, list(reference)))
        value, expected, name = config[key], reference[key], f'{section}.{key}'
        expected_type = reference.get_type(key)
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f'{name}={value!r} is invalid; allowed: a section with keys '
                                 f'{list(expected)}')
            _check_section(value, expected, name)
        elif not _has_type(value, expected, expected_type):
            raise ConfigError(f'{name}={value!r} is invalid; allowed: '
                             f'{_type_name(expected, expected_type)}')


def _has_type(value, expected, expected_type: type) -> bool:
    """Whether `value` may stand where `base()` has `expected` (declared as `expected_type`,
    which differs for a FieldReference holding None). An int is a float; a bool is no number."""
    if value is None:
        return expected is None
    if isinstance(value, bool) or expected_type is bool:
        return isinstance(value, bool) and expected_type is bool
    if expected_type is float:
        return isinstance(value, (int, float))
    if expected_type is tuple:
        return isinstance(value, (tuple, list)) and all(
            _has_type(v, expected[0], type(expected[0])) for v in value)
    return isinstance(value, expected_type)


def _type_name(expected, expected_type: type) -> str:
    if expected_type is tuple:
        return f'a tuple of {type(expected[0]).__name__}s'
    return f'{expected_type.__name__}{" or None" if expected is None else ""}'
