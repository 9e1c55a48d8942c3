"""Config helpers shared by `configs/*.py`: argument parsing, presets, the recipe.

Configs stay declarative, as in big_vision; every rule of the recipe (docs/paper.md §4-6)
lives here once. Loading a config file imports this module and ml_collections only: the checks
that need the models, the augmentations and the dataset registry are `config_check.py`'s.

Departure from big_vision: durations are in epochs (`num_epochs`, `warmup_epochs`), because the
paper states its recipe in epochs and the step count depends on the dataset's size, which is
only known when the shards are opened. `steps()` converts them once, at start-up.
"""

from __future__ import annotations

import dataclasses
import difflib

import ml_collections

from sdtl_jax.errors import UserError

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
# Table 1's augmentation pipelines, built by `data/augment/pipelines.py`; here so that the
# augmentation study's config lists them without importing grain and OpenCV.
AUGMENTATIONS = ('none', 'pytorch', 'autoaugment', 'augmix', 'pixmix', 'multicrop')
IF_CONFIG_CHANGED = ('stop', 'move_aside')
# Studies (configs/study/, run by study.py) and the layer study's transfer directions:
# direction -> (source domain, target domain, run-name prefix).
STUDIES = ('layers', 'data_reduction', 'augmentations')
DIRECTIONS = {'synth_to_real': ('synth', 'real', 'SDTL'),
              'real_to_synth': ('real', 'synth', 'RDTL')}


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

    # Augmentation: one of AUGMENTATIONS (Table 1); DINO multi-crop (docs/paper.md §5) is
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


def compute_dtype(name: str, platform: str) -> str:
    """Resolves `config.dtype`: 'auto' is bfloat16 on accelerators, float32 on CPU (where
    bfloat16 is emulated and slower)."""
    if name == 'auto':
        return 'float32' if platform == 'cpu' else 'bfloat16'
    return name


def add_study(config: ml_collections.ConfigDict, name: str, dataset: str) -> None:
    """Adds the `study` section every study config shares."""
    if name not in STUDIES:
        raise ValueError(f'Unknown study {name!r}; allowed: {STUDIES}')
    config.study = ml_collections.ConfigDict()
    config.study.name = name
    config.study.dataset = dataset      # for the report: the paper's numbers beside ours
    config.study.only = ''              # comma-separated run names; '' = every run
    config.study.report = True          # write report.md and the figures when done


def is_study(config: ml_collections.ConfigDict) -> bool:
    return 'study' in config
