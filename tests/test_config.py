"""Configs load, validate, and reject bad values with the key named."""
import importlib.util
import pathlib

import pytest

from sdtl_jax import config_lib

CONFIGS = sorted(pathlib.Path(__file__).parent.parent.glob('configs/*.py'))


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
    config_lib.validate(config, num_devices=8)


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
    with pytest.raises(ValueError, match=message):
        load(pathlib.Path('configs/real_to_synth.py'), arg)


@pytest.mark.parametrize('key, value, message', [
    ('transfer.num_frozen', 19, 'transfer.num_frozen'),
    ('transfer.num_frozen', -1, 'transfer.num_frozen'),
    ('transfer.frozen_bn', 'train', 'transfer.frozen_bn'),
    ('global_batch', 12, 'global_batch'),
    ('dtype', 'float16', 'dtype'),
    ('data.train_fraction', 0.0, r'data.train_fraction=0.0 is invalid; allowed: \(0, 1\]'),
    ('data.train_fraction', 1.5, 'data.train_fraction'),
    ('aug.name', 'randaugment', "aug.name='randaugment' is invalid; allowed: .*'augmix'"),
    ('data.num_workers', -2, 'data.num_workers'),
])
def test_validate_rejects_out_of_range_values(key, value, message):
    c = load(pathlib.Path('configs/real_to_synth.py'))
    section, _, name = key.rpartition('.')
    (c[section] if section else c)[name] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c, num_devices=8)


def test_frozen_layers_need_a_source():
    c = load(pathlib.Path('configs/baseline.py'))
    c.transfer.num_frozen = 4
    with pytest.raises(ValueError, match='transfer.num_frozen'):
        config_lib.validate(c, num_devices=1)


def test_steps_drop_the_last_partial_batch():
    c = load(pathlib.Path('configs/real_to_synth.py'))
    s = config_lib.steps(c, 126_689)          # ImageNet-100 real train
    assert (s.per_epoch, s.total, s.warmup) == (1979, 197_900, 19_790)


def test_auto_dtype_is_bfloat16_on_accelerators_only():
    assert config_lib.compute_dtype('auto', 'cpu') == 'float32'
    assert config_lib.compute_dtype('auto', 'gpu') == 'bfloat16'
    assert config_lib.compute_dtype('auto', 'tpu') == 'bfloat16'
    assert config_lib.compute_dtype('float32', 'gpu') == 'float32'
