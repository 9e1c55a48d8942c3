"""Config validation: `validate` (a whole config, before any compute) and `check_overrides`
(the keys of `--config.<key>` flags).

Apart from `config_lib` because the checks need the models (their keyword arguments and own
checks), the augmentation pipelines and the dataset registry, which import JAX, Flax, grain and
OpenCV: loading a config file must not wait for them.

Validation happens once per command, where a config enters: `experiment.run` (one experiment,
from `main.py` or a notebook) or `study.expand` (every run of a study, before the first
trains). The functions these hand the config to take it as validated.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math

import ml_collections

from sdtl_jax import config_lib, models
from sdtl_jax.config_lib import ConfigError
from sdtl_jax.data import sources
from sdtl_jax.models import layers


def validate(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int = 1,
             num_layers: int = layers.NUM_LAYERS) -> None:
    """Rejects impossible configs before any compute, naming the key, the value and what is
    allowed.

    Keys and types are checked against `base()`'s (and the model's keyword arguments): a config
    file may add keys to the unlocked ConfigDict `base()` returns, ml_collections lets a bool
    through where an int is expected and leaves tuple elements unchecked, and a study's run
    configs are rebuilt from plain dicts, which carry no types.
    """
    check = functools.partial(_check, config)
    check(config.model.name in config_lib.MODELS, 'model.name', list(config_lib.MODELS))
    _check_section(config, _reference(config.model.name), 'config')

    check(config.seed >= 0, 'seed', '>= 0')
    check(config.dtype in config_lib.DTYPES, 'dtype', list(config_lib.DTYPES))
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

    check(config.aug.name in config_lib.AUGMENTATIONS, 'aug.name', list(config_lib.AUGMENTATIONS))
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
    peak_lr = config_lib.learning_rate(config)
    check(0 <= config.optim.end_lr <= peak_lr, 'optim.end_lr',
          f'0..the peak LR, optim.base_lr * global_batch / 256 = {peak_lr:g}')
    check(0 <= config.optim.momentum < 1, 'optim.momentum', '[0, 1)')
    check(math.isfinite(config.optim.weight_decay) and config.optim.weight_decay >= 0,
          'optim.weight_decay', '>= 0')

    check(0 <= config.transfer.num_frozen <= num_layers, 'transfer.num_frozen',
          f'0..{num_layers}')
    check(not config.transfer.num_frozen or config_lib.is_transfer(config),
          'transfer.num_frozen', '0 when there is no transfer.source_data or transfer.init_from')
    check(config.transfer.frozen_bn in layers.FROZEN_BN, 'transfer.frozen_bn',
          list(layers.FROZEN_BN))
    check(config.if_config_changed in config_lib.IF_CONFIG_CHANGED, 'if_config_changed',
          list(config_lib.IF_CONFIG_CHANGED))


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
    reference = config_lib.base(data='imagenet100')
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
