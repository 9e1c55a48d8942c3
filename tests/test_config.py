"""Configs load, validate, and reject bad values with the key named."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from sdtl_jax import config_check, config_lib

ROOT = pathlib.Path(__file__).parent.parent
CONFIGS = sorted(ROOT.glob('configs/*.py'))


def load(path, arg=None):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize('arg', [None, 'demo', 'smoke', 'model=tinyvit_5m,data=pets',
                                 'model=tinyvit_5m,data=pets,smoke'])
def test_every_config_loads_and_validates(path, arg):
    config = load(path, arg)
    config_check.validate(config, num_devices=8)


def test_paper_recipe_values():
    c = load(pathlib.Path('configs/real_to_synth.py'))
    assert (c.num_epochs, c.warmup_epochs, c.global_batch) == (100, 10, 64)
    assert (c.optim.momentum, c.optim.weight_decay, c.optim.end_lr) == (0.9, 1e-4, 1e-6)
    assert config_lib.learning_rate(c) == pytest.approx(0.1 * 64 / 256)
    assert (c.aug.global_size, c.aug.num_global, tuple(c.aug.global_scale)) == (224, 1, (0.25, 1))
    assert (c.aug.local_size, c.aug.num_local, tuple(c.aug.local_scale)) == (96, 8, (0.05, 0.25))
    assert (c.eval.resize, c.eval.crop, c.eval.last_epochs) == (256, 224, 5)
    assert c.model.name == 'resnet50'
    assert (c.transfer.source_data, c.data.train, c.data.eval) == (
        'imagenet100_real', 'imagenet100_synth', 'imagenet100_real')
    pets = load(pathlib.Path('configs/synth_to_real.py'), 'model=tinyvit_5m,data=pets')
    assert (pets.global_batch, pets.data.eval_split, pets.model.name) == (32, 'test', 'tinyvit_5m')
    assert (pets.transfer.source_data, pets.data.train) == ('pets_synth', 'pets_real')


def test_num_frozen_argument():
    assert load(pathlib.Path('configs/synth_to_real.py'), 'num_frozen=4').transfer.num_frozen == 4


def test_source_stage_trains_on_the_source_domain():
    c = load(pathlib.Path('configs/real_to_synth.py'), 'demo,num_frozen=4')
    c.data.train_fraction = 0.125
    s = config_lib.source_stage(c)
    assert (s.data.train_fraction, c.data.train_fraction) == (1.0, 0.125)   # Table 6
    assert (s.data.train, s.transfer.num_frozen, s.transfer.source_data) == ('digits_real', 0, '')
    assert c.data.train == 'digits_synth'     # the original is untouched


@pytest.mark.parametrize('arg, message', [
    ('num_frozn=4', 'num_frozn'),
    ('num_frozen=four', 'num_frozen'),
    ('model=vgg', 'vgg'),
    ('data=cifar', 'cifar'),
])
def test_bad_arguments_name_the_key(arg, message):
    with pytest.raises(config_lib.ConfigArgumentError, match=message):
        load(pathlib.Path('configs/real_to_synth.py'), arg)


def with_values(config, **values):
    """`config` with dotted keys set, through a plain dict (as a study builds its runs' configs),
    so any type gets through to `validate`."""
    d = config.to_dict()
    for key, value in values.items():
        *sections, name = key.split('.')
        node = d
        for section in sections:
            node = node[section]
        node[name] = value
    return ml_collections.ConfigDict(d)


def paper_baseline(key, value):
    return with_values(load(ROOT / 'configs/baseline.py'), **{key: value})


PEAK_LR = 0.1 * 64 / 256


@pytest.mark.parametrize('key, value, allowed', [
    # Types: ml_collections lets a bool through for an int; a study's configs and tests build
    # ConfigDicts from plain dicts, which keep no types at all.
    ('global_batch', '64', 'int'),
    ('global_batch', 64.0, 'int'),
    ('global_batch', None, 'int'),
    ('num_epochs', True, 'int'),
    ('optim.base_lr', True, 'float'),
    ('data.stratified', 1, 'bool'),
    ('dtype', 16, 'str'),
    ('aug.global_scale', ('abc',), 'a tuple of floats'),
    ('data.max_train_examples', 2.5, 'int or None'),
    ('model.width', '8', 'int'),
    ('model.stage_sizes', (3.0, 4, 6, 3), 'a tuple of ints'),
    ('optim', 0.1, "a section with keys ['base_lr', 'end_lr', 'momentum', 'weight_decay']"),
    # Values.
    ('seed', -1, '>= 0'),
    ('model.name', 'vgg', "['resnet50', 'tinyvit_5m']"),
    ('dtype', 'float16', "['auto', 'float32', 'bfloat16']"),
    ('data.eval', 'cifar10', "['digits_real', 'digits_synth', 'imagenet100_real'"),
    ('data.train', 'pets_real',
     "['imagenet100_real', 'imagenet100_synth'] (the labels of data.eval='imagenet100_real')"),
    ('data.real', 'imagenet100_synth', "['imagenet100_real'] (the labels of data.eval="),
    ('data.synth', 'imagenet100_real', "['imagenet100_synth'] (the labels of data.eval="),
    ('transfer.source_data', 'pets_synth', "['', 'imagenet100_real', 'imagenet100_synth']"),
    ('data.train_fraction', 0.0, '(0, 1]'),
    ('data.train_fraction', 1.5, '(0, 1]'),
    ('data.max_train_examples', 0, 'None (all) or >= 1'),
    ('data.num_workers', -2, '-1 (one per core), 0 or more'),
    ('data.num_threads', 0, '>= 1'),
    ('aug.name', 'randaugment', "['none', 'pytorch', 'autoaugment', 'augmix', 'pixmix', "
                                "'multicrop']"),
    ('aug.global_size', 0, '>= 1 (pixels)'),
    ('aug.local_size', -96, '>= 1 (pixels)'),
    ('aug.num_global', 0, '>= 1'),
    ('aug.num_local', -1, '>= 0'),
    ('aug.global_scale', (0.5, 0.25), '(low, high) with 0 < low <= high <= 1'),
    ('aug.global_scale', (0.0, 1.0), '(low, high) with 0 < low <= high <= 1'),
    ('aug.local_scale', (0.05, 0.25, 0.5), '(low, high) with 0 < low <= high <= 1'),
    ('aug.local_scale', (0.05, 1.5), '(low, high) with 0 < low <= high <= 1'),
    ('eval.resize', 0, '>= 1 (pixels)'),
    ('eval.crop', 300, '1..eval.resize (256)'),
    ('eval.crop', 0, '1..eval.resize (256)'),
    ('global_batch', 12, 'a positive multiple of the device count (8) and process count (1)'),
    ('global_batch', 0, 'a positive multiple of the device count (8)'),
    ('eval.global_batch', 100, 'a positive multiple of the device count (8)'),
    ('num_epochs', 0, '>= 1'),
    ('warmup_epochs', -1, '0..num_epochs (100)'),
    ('warmup_epochs', 101, '0..num_epochs (100)'),
    ('eval.every_epochs', 0, '>= 1'),
    ('eval.last_epochs', 0, '1..num_epochs (100)'),
    ('eval.last_epochs', 101, '1..num_epochs (100)'),
    ('checkpoint.every_epochs', 0, '>= 1'),
    ('checkpoint.keep', 0, '>= 1'),
    ('log_every_steps', 0, '>= 1'),
    ('optim.base_lr', 0.0, '> 0'),
    ('optim.base_lr', float('inf'), '> 0'),
    ('optim.end_lr', -1e-6, f'0..the peak LR, optim.base_lr * global_batch / 256 = {PEAK_LR}'),
    ('optim.end_lr', 1.0, f'0..the peak LR, optim.base_lr * global_batch / 256 = {PEAK_LR}'),
    ('optim.momentum', 1.0, '[0, 1)'),
    ('optim.weight_decay', -1e-4, '>= 0'),
    ('transfer.num_frozen', 19, '0..18'),
    ('transfer.num_frozen', -1, '0..18'),
    ('transfer.num_frozen', 4, '0 when there is no transfer.source_data or transfer.init_from'),
    ('transfer.frozen_bn', 'train', "['inference', 'adapt']"),
])
def test_validate_names_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ValueError) as e:
        config_check.validate(paper_baseline(key, value), num_devices=8)
    assert str(e.value).startswith(f'config.{key}={value!r} is invalid; allowed: {allowed}')


def test_validate_accepts_boundaries_and_equivalent_types():
    c = with_values(load(ROOT / 'configs/real_to_synth.py'), **{
        'optim.base_lr': 1,                       # an int where a float is expected
        'aug.global_scale': [0.5, 1.0],           # a list (from JSON) where a tuple is
        'aug.local_scale': (1.0, 1.0),
        'data.max_train_examples': 24,            # a number where base() has None
        'data.train_fraction': 1.0, 'warmup_epochs': 100, 'eval.last_epochs': 100,
        'optim.end_lr': 0.0, 'optim.momentum': 0.0, 'optim.weight_decay': 0.0,
        'transfer.num_frozen': 18, 'seed': 0, 'aug.num_local': 0, 'eval.crop': 256,
    })
    config_check.validate(c, num_devices=64, num_processes=8)


def test_model_values_are_checked_by_the_model():
    with pytest.raises(ValueError) as e:
        config_check.validate(paper_baseline('model.stage_sizes', (3, 4, 6, 4)), num_devices=1)
    assert str(e.value).startswith("config.model={'name': 'resnet50', 'stage_sizes': (3, 4, 6, 4)}"
                                   ' is invalid: stage_sizes must sum to 16')


OPTIM_KEYS = "['base_lr', 'end_lr', 'momentum', 'weight_decay']"


@pytest.mark.parametrize('key, message', [
    ('optim.lrr', f'config.optim.lrr is not a config key; allowed in config.optim: {OPTIM_KEYS}'),
    ('optim.momentun', 'config.optim.momentun is not a config key; did you mean '
                       f'config.optim.momentum? allowed in config.optim: {OPTIM_KEYS}'),
    ('num_epoch', 'config.num_epoch is not a config key; did you mean config.num_epochs? '
                  "allowed in config: ['aug', 'checkpoint', 'data', 'dtype', 'eval', "),
    ('model.widht', 'config.model.widht is not a config key; did you mean config.model.width? '
                    "allowed in config.model: ['name', 'stage_sizes', 'tau', 'width']"),
])
def test_unknown_keys_in_a_config_file_are_rejected(key, message):
    c = load(ROOT / 'configs/baseline.py', 'demo')
    section, _, name = key.rpartition('.')
    (c[section] if section else c)[name] = 1      # base() returns an unlocked ConfigDict
    with pytest.raises(ValueError) as e:
        config_check.validate(c, num_devices=1)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize('key, message', [
    ('optim.lrr', f'config.optim.lrr is not a config key; allowed in config.optim: {OPTIM_KEYS}'),
    ('optimm.base_lr', 'config.optimm is not a config key; did you mean config.optim? '),
    ('seed.x', 'config.seed.x is not a config key; allowed in config.seed: none, it holds a '
               'value'),
])
def test_unknown_command_line_keys_are_named(key, message):
    c = load(ROOT / 'configs/baseline.py', 'demo')
    config_check.check_overrides(c, ['optim.base_lr', 'model.width'])    # known keys pass
    with pytest.raises(ValueError) as e:
        config_check.check_overrides(c, ['optim.base_lr', key])
    assert str(e.value).startswith(message)


@pytest.mark.parametrize('override, message', [
    # Flag parsing: ml_collections' own error would be a long KeyError traceback.
    ('--config.optim.momentun=0.5', 'FATAL Flags parsing error: config.optim.momentun is not a '
                                    'config key; did you mean config.optim.momentum?'),
    # The transfer's source stage resets the fraction: without the check in main it would build
    # the data and train before the target stage's config was looked at.
    ('--config.data.train_fraction=1.5', 'FATAL config error: config.data.train_fraction=1.5 is '
                                         'invalid; allowed: (0, 1]'),
], ids=['unknown_key', 'bad_value'])
def test_command_line_config_errors_are_one_line_before_any_data(override, message, tmp_path):
    data_dir, workdir = tmp_path / 'data', tmp_path / 'run'
    result = subprocess.run(
        [sys.executable, '-m', 'sdtl_jax.main', '--config=configs/real_to_synth.py:smoke',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', override],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not data_dir.exists() and not workdir.exists()


def test_steps_drop_the_last_partial_batch():
    c = load(pathlib.Path('configs/real_to_synth.py'))
    s = config_lib.steps(c, 126_689)          # ImageNet-100 real train
    assert (s.per_epoch, s.total, s.warmup) == (1979, 197_900, 19_790)


def test_auto_dtype_is_bfloat16_on_accelerators_only():
    assert config_lib.compute_dtype('auto', 'cpu') == 'float32'
    assert config_lib.compute_dtype('auto', 'gpu') == 'bfloat16'
    assert config_lib.compute_dtype('auto', 'tpu') == 'bfloat16'
    assert config_lib.compute_dtype('float32', 'gpu') == 'float32'


HEAVY = ('jax', 'flax', 'cv2', 'grain', 'optax', 'orbax')


@pytest.mark.parametrize('config', ['configs/real_to_synth.py:demo', 'configs/baseline.py:smoke',
                                    'configs/study/layers.py:smoke'])
def test_loading_a_config_imports_nothing_heavy(config):
    """A config file loads in a fraction of a second: configs only need ml_collections."""
    path, arg = config.split(':')
    code = (f"import runpy, sys; runpy.run_path({path!r})['get_config']({arg!r}); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == '[]', result.stdout


def _count_validations(monkeypatch):
    from sdtl_jax import config_check, experiment

    calls = []
    validate = config_check.validate
    monkeypatch.setattr(config_check, 'validate',
                        lambda config, **kw: (calls.append(config.data.train),
                                              validate(config, **kw)))
    stages = []

    def stage(config, workdir, source=''):      # a finished stage, without training
        stages.append((config.data.train, os.path.basename(workdir)))
        os.makedirs(workdir, exist_ok=True)
        pathlib.Path(workdir, 'results.json').write_text('{}')
        return {}

    monkeypatch.setattr(experiment, 'stage', stage)
    return calls, stages


def test_an_experiment_validates_its_config_once(monkeypatch, tmp_path):
    from sdtl_jax import experiment

    calls, stages = _count_validations(monkeypatch)
    experiment.run(load(ROOT / 'configs/real_to_synth.py', 'smoke'), str(tmp_path / 'run'))
    assert calls == ['digits_synth']                    # the target stage's config, before both
    assert stages == [('digits_real', 'source'), ('digits_synth', 'run')]


def test_a_study_validates_each_run_once(monkeypatch, tmp_path):
    from sdtl_jax import study

    calls, stages = _count_validations(monkeypatch)
    config = load(ROOT / 'configs/study/layers.py', 'smoke')
    config.study.report = False
    runs = study.run(config, str(tmp_path))
    assert len(calls) == len(runs) == len(stages) == 4
