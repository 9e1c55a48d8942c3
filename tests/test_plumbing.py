"""Plumbing that no result checks: what a run passes on, where an output alone would not show it.

The evaluation's resize and crop, the training subset's stratification, the benchmark's crops,
and the smoke data-reduction study's training sets, on the embedded digits.
"""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

from bench import step_common
from sdtl_jax import config_lib, experiment
from sdtl_jax.data import input_pipeline, reader, sources, subsets
from sdtl_jax.data.augment import eval_view, multicrop, pipelines

ROOT = pathlib.Path(__file__).parent.parent
EVAL_RESIZE, EVAL_CROP = 48, 32     # resize != crop, unlike every shipped config's


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('data'))


def test_eval_batches_resize_the_shorter_side_then_crop(data_dir):
    split = sources.resolve('digits_real', data_dir, 'val')
    indices = list(range(8))
    batch, = input_pipeline.eval_batches(split, global_batch=8, resize=EVAL_RESIZE,
                                         crop=EVAL_CROP, num_threads=1, indices=indices)
    records = reader.RecordReader(split)
    expected = [eval_view.EvalTransform(EVAL_RESIZE, EVAL_CROP).map(records[i])['image']
                for i in indices]
    cropped_only = [eval_view.EvalTransform(EVAL_CROP, EVAL_CROP).map(records[i])['image']
                    for i in indices]
    assert not np.array_equal(expected, cropped_only)   # the two settings are told apart
    np.testing.assert_array_equal(batch['image'], np.stack(expected))


@pytest.fixture(scope='module')
def stratified_run(data_dir, tmp_path_factory):
    """A smoke run with eval.resize != eval.crop and a stratified half of the training set,
    recording the arguments of every evaluation pipeline it builds (which the results do not
    show: a barely trained model scores the same on either image size)."""
    from test_train import smoke

    config = smoke('baseline', 'domain=real', data_dir, **{
        'aug.name': 'none', 'eval.resize': EVAL_RESIZE, 'data.stratified': True,
        'data.train_fraction': 0.5})
    workdir = tmp_path_factory.mktemp('stratified')
    calls = []
    real_eval_batches = input_pipeline.eval_batches

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real_eval_batches(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(input_pipeline, 'eval_batches', recording)
        experiment.run(config, str(workdir))
    return config, workdir, calls


def test_training_evaluates_with_eval_resize_and_crop(stratified_run):
    _, _, calls = stratified_run
    assert calls and all((c['resize'], c['crop']) == (EVAL_RESIZE, EVAL_CROP) for c in calls)


def test_training_draws_the_stratified_subset_it_is_told_to(stratified_run, data_dir):
    config, workdir, _ = stratified_run
    stored = json.loads((workdir / subsets.SUBSET_FILE).read_text())
    assert stored['stratified'] is True
    split = sources.resolve('digits_real', data_dir, 'train')
    labels = subsets.split_labels(split)
    size = config.data.max_train_examples    # the smoke cap, below half of the split
    assert stored['indices'] == subsets.stratified(labels, size, config.seed).tolist()
    assert stored['indices'] != subsets.uniform(len(labels), size, config.seed).tolist()


def test_multicrop_defaults_are_the_training_recipe():
    """Loaders and benchmarks that build MultiCrop() get what training builds from the config."""
    recipe = pipelines.build(config_lib.base(data='imagenet100').aug)
    assert vars(multicrop.MultiCrop()) == vars(recipe)


def test_benchmark_crops_come_from_the_config(monkeypatch):
    base = config_lib.base

    def other_scales(**kwargs):
        config = base(**kwargs)
        config.aug.global_scale, config.aug.local_scale = (0.5, 1.0), (0.1, 0.3)
        return config

    monkeypatch.setattr(config_lib, 'base', other_scales)
    spec = step_common.paper_spec('resnet50', full_size=False)
    crop = step_common.recipe_multicrop(spec)
    assert (crop.global_scale, crop.local_scale) == ((0.5, 1.0), (0.1, 0.3))
    assert (crop.num_global, crop.global_size, crop.num_local, crop.local_size) == (
        spec.num_global, spec.global_size, spec.num_local, spec.local_size)
    batch = step_common.synthetic_batch(spec)
    assert batch['local'].shape == (spec.batch, spec.num_local, spec.local_size,
                                    spec.local_size, 3)


def _study_config(name, arg):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / 'study' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_smoke_data_reduction_trains_each_fraction_on_fewer_images(data_dir):
    from sdtl_jax import study

    runs = study.expand(_study_config('data_reduction', 'smoke'))
    split = sources.resolve('digits_real', data_dir, 'train')
    for kind in ('baseline', 'transfer'):
        reduced = sorted((r for r in runs if r.kind == kind and r.domain == 'real'),
                         key=lambda r: -r.config.data.train_fraction)
        sizes = [len(subsets.select(
            split, fraction=r.config.data.train_fraction, stratify=r.config.data.stratified,
            seed=r.config.seed, max_examples=r.config.data.max_train_examples))
            for r in reduced]
        assert len(sizes) >= 2 and all(a > b for a, b in zip(sizes, sizes[1:])), sizes
        assert sizes[-1] >= reduced[-1].config.global_batch     # one batch, at least
