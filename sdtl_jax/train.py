"""One stage of training: one jitted, data-parallel step; evaluation each epoch; resume.

`train_and_evaluate` reads top to bottom: the data (`_read_data`), the model, the state to
start from (`_initial_or_resumed`: resume, transfer or scratch), the loop (`_train`) and the
results (`_results`). `experiment.py` decides which stages run and checks their workdirs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sdtl_jax import (
    checkpointing,
    config_lib,
    evaluate,
    fileio,
    metrics_io,
    models,
    optim,
    sharding,
    workdir_guard,
)
from sdtl_jax.data import input_pipeline, layout, reader, sources, subsets
from sdtl_jax.data.augment import normalize, photometric


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position; arrays only, for Orbax."""
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def initial_state(params, batch_stats, tx, rng) -> TrainState:
    """Step 0: the given weights, a fresh optimizer state."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=rng)


def train_step(state: TrainState, batch: dict, *, model, tx, lr_fn, dtype):
    """One SGD step on a multi-crop batch; pure, reads no config.

    The model runs twice (docs/paper.md §5): on the global crops, then on all local crops, so
    BatchNorm batch statistics are per resolution and the running statistics are updated by
    both passes in that order. The loss is the mean cross-entropy over every crop.
    """
    labels = batch['label']

    def loss_fn(params):
        stats = state.batch_stats
        loss_sum, num_crops = 0.0, 0
        for key in ('global', 'local'):
            if key not in batch:
                continue
            crops = batch[key]
            per_image = crops.shape[1]
            images = crops.reshape((-1,) + crops.shape[2:])
            if f'{key}_ops' in batch:   # multi-crop's light ops run here, on the device
                images = photometric.apply(
                    images, batch[f'{key}_ops'].reshape(-1, photometric.NUM_OPS))
            images = normalize.normalize(images, dtype)
            (logits, _), updates = model.apply(
                {'params': params, 'batch_stats': stats}, images, train=True,
                mutable=['batch_stats'])
            stats = updates['batch_stats']
            crop_labels = jnp.repeat(labels, per_image)   # crops of an image are adjacent
            loss_sum += optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), crop_labels).sum()
            num_crops += images.shape[0]
        return loss_sum / num_crops, stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, {'loss': loss, 'lr': lr_fn(state.step)}


def num_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _dtype(name: str):
    name = config_lib.compute_dtype(name, jax.devices()[0].platform)
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, source: str = '',
                       heartbeat: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Trains one stage per `config` into `workdir`, resuming from its latest checkpoint;
    returns results.json's dict. The config is validated and the workdir checked and locked
    (`experiment.stage`); `heartbeat` keeps that lock fresh.

    Restore order (big_vision): the checkpoint in `workdir`, then layers from `source` (a run
    workdir or checkpoints folder) for a transfer, then scratch.
    """
    t_start = time.time()
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh()
    data = _read_data(config, workdir, write_subset=is_main)
    dtype = _dtype(config.dtype)
    model = models.build(config.model, num_classes=len(data.train.classes),
                         num_frozen=config.transfer.num_frozen,
                         frozen_bn=config.transfer.frozen_bn, dtype=dtype)

    # Finished before: reuse (the source stage of a transfer is shared by every N).
    results_path = os.path.join(workdir, 'results.json')
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                      keep=config.checkpoint.keep)
    if fileio.exists(results_path) and ckpt.latest_step() == data.steps.total:
        metrics_io.say(f'{workdir} is finished; reusing its results')
        ckpt.close()
        return metrics_io.read_json(results_path)

    writer = metrics_io.Writer(workdir, enabled=is_main)
    writer.write_config(config)
    skip_log = reader.SkipLog(workdir, jax.process_index())
    state, tx, lr_fn, train_iter = _initial_or_resumed(config, workdir, source, model, data,
                                                      mesh, ckpt, skip_log)
    if is_main:     # evaluations after the checkpoint resumed from (or all, from scratch)
        metrics_io.cut_metrics(workdir, int(state.step))
        workdir_guard.check_free_space(workdir, _nbytes(state), config.checkpoint.keep)
    param_counts = _describe(config, workdir, model, data, state)

    replicated = sharding.replicated(mesh)
    previous = metrics_io.read_metrics(workdir) if is_main else []
    loop = _Loop(config=config, workdir=workdir, data=data, mesh=mesh, ckpt=ckpt, writer=writer,
                 skip_log=skip_log,
                 step_fn=jax.jit(functools.partial(train_step, model=model, tx=tx, lr_fn=lr_fn,
                                                   dtype=dtype),
                                 donate_argnums=0, out_shardings=(replicated, replicated)),
                 eval_fn=evaluate.make_eval_fn(model, mesh, dtype),
                 timer=_StepTimer(int(state.step)), t_start=t_start,
                 wall_offset=previous[-1]['wall_s'] if previous else 0.0,
                 last_epochs=range(config.num_epochs - config.eval.last_epochs + 1,
                                   config.num_epochs + 1))
    if config.transfer.num_frozen == len(model.layer_names()):
        # N = 18: every layer is taken over; evaluate the pre-trained model untouched.
        _evaluate(loop, state, epoch=0, step=0, train_loss=None, lr=0.0)
        ckpt.save(data.steps.total, state, train_iter)
        loop.last_epochs = range(0, 1)
    else:
        _train(loop, state, train_iter, heartbeat)
    ckpt.wait_until_finished()
    ckpt.close()
    results = _results(loop, source, param_counts) if is_main else {}
    writer.close()
    return results


@dataclasses.dataclass(frozen=True)
class _Data:
    """What a stage reads: the splits, its reduced training set (Table 6) and its step counts."""
    data_dir: str
    train: sources.DatasetSplit
    eval: sources.DatasetSplit
    train_indices: np.ndarray | None    # None: the whole training split
    num_train: int
    steps: config_lib.Steps


def _read_data(config: ml_collections.ConfigDict, workdir: str, *,
               write_subset: bool) -> _Data:
    data_dir = config.data.data_dir or layout.default_data_dir()
    train_split = sources.resolve(config.data.train, data_dir, config.data.train_split)
    eval_split = sources.resolve(config.data.eval, data_dir, config.data.eval_split)
    if list(train_split.classes) != list(eval_split.classes):
        raise ValueError(f'Class lists differ: data.train={config.data.train!r} and '
                         f'data.eval={config.data.eval!r} must use the same labels')
    # Before the subset is stored: a fraction too small for one batch must not leave a subset
    # file behind that the corrected rerun would refuse as another draw.
    config_lib.steps(config, subsets.subset_size(
        train_split.num_examples, config.data.train_fraction, config.data.max_train_examples))
    # The reduced training set (Table 6), drawn once and stored in the workdir.
    train_indices = subsets.select(
        train_split, fraction=config.data.train_fraction, stratify=config.data.stratified,
        seed=config.seed, max_examples=config.data.max_train_examples, workdir=workdir,
        write=write_subset)
    num_train = train_split.num_examples if train_indices is None else len(train_indices)
    return _Data(data_dir=data_dir, train=train_split, eval=eval_split,
                 train_indices=train_indices, num_train=num_train,
                 steps=config_lib.steps(config, num_train))


def _skip_settings(config: ml_collections.ConfigDict, skip_log: reader.SkipLog) -> dict:
    return dict(skip_corrupt=config.data.skip_corrupt, skip_log=skip_log.path)


def _initial_or_resumed(config, workdir, source, model, data, mesh, ckpt, skip_log):
    """The state to start from (the workdir's checkpoint, else the source's layers, else
    scratch), the optimizer and schedule, and the training batches from the matching position.
    """
    replicated = sharding.replicated(mesh)
    # The transfer stage draws other initial weights than its source did: re-initialised layers
    # must not restart from the source's own initialisation.
    stage_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1 if source else 0)
    init_rng, state_rng = jax.random.split(stage_key)
    variables = jax.jit(functools.partial(models.init, model, image_size=config.aug.global_size),
                        out_shardings=replicated)(init_rng)
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    layer_names = model.layer_names()
    tx, lr_fn = optim.make(config, params, layer_names, warmup_steps=data.steps.warmup,
                           total_steps=data.steps.total)

    aug = {**config.aug.to_dict(),
           'pixmix_cache_dir': os.path.join(data.data_dir, 'pixmix_fractals')}
    train_iter = iter(input_pipeline.train_dataset(
        data.train, global_batch=config.global_batch, seed=config.seed, aug=aug,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=config.data.num_threads, num_workers=config.data.num_workers,
        indices=data.train_indices, **_skip_settings(config, skip_log)))

    # One program: made eagerly, the optimizer state compiles a zeros op per parameter shape
    # (~30 compiles, 2-3 s for ResNet-50 at every start; seen in bench.rehearsal's compile log).
    new_state = jax.jit(lambda params, batch_stats: initial_state(params, batch_stats, tx,
                                                                  state_rng),
                        out_shardings=replicated)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(new_state(params, batch_stats), train_iter)
        metrics_io.say(f'Resumed {workdir} at step {int(state.step)}')
        return state, tx, lr_fn, train_iter
    layers = config_lib.transferred_layers(config, layer_names)
    if source and layers:
        params, batch_stats, source_step = checkpointing.load_for_transfer(
            jax.device_get(params), jax.device_get(batch_stats), source, layers)
        metrics_io.say(f'{workdir}: loaded layers {layers[0]}..{layers[-1]} from {source} '
                       f'(step {source_step}, its last)')
    return new_state(params, batch_stats), tx, lr_fn, train_iter


def _describe(config, workdir: str, model, data: _Data, state: TrainState) -> dict[str, int]:
    """Says what trains; returns the parameter counts results.json reports."""
    layer_names, num_frozen = model.layer_names(), config.transfer.num_frozen
    counts = {'num_params': num_params(state.params),
              'num_trainable_params': num_params({k: v for k, v in state.params.items()
                                                  if k not in layer_names[:num_frozen]})}
    metrics_io.say(
        f'{workdir}: {config.model.name} on {config.data.train} ({data.num_train:,} of '
        f'{data.train.num_examples:,} images, {config.aug.name}), {counts["num_params"]:,} params '
        f'({counts["num_trainable_params"]:,} trainable, {num_frozen} of {len(layer_names)} '
        f'layers frozen), global batch {config.global_batch} '
        f'({config.global_batch // jax.device_count()} per device), {data.steps.total} steps '
        f'({data.steps.per_epoch} per epoch)')
    return counts


@dataclasses.dataclass
class _Loop:
    """What the training loop and its evaluations use, set up once per stage."""
    config: ml_collections.ConfigDict
    workdir: str
    data: _Data
    mesh: jax.sharding.Mesh
    ckpt: checkpointing.Checkpointer
    writer: metrics_io.Writer
    skip_log: reader.SkipLog
    step_fn: Callable
    eval_fn: Callable
    timer: _StepTimer
    t_start: float
    wall_offset: float      # wall seconds of the runs before a resume
    last_epochs: range      # the evaluations results.json averages


def _evaluate(loop: _Loop, state: TrainState, *, epoch: int, step: int,
              train_loss: float | None, lr: float) -> dict[str, Any]:
    """Top-1/top-5 on the whole eval split, logged to metrics.jsonl and TensorBoard."""
    config = loop.config
    acc = evaluate.accuracy(loop.eval_fn, state.params, state.batch_stats,
                            input_pipeline.eval_batches(
                                loop.data.eval, global_batch=config.eval.global_batch,
                                resize=config.eval.resize, crop=config.eval.crop,
                                process_index=jax.process_index(),
                                process_count=jax.process_count(),
                                **_skip_settings(config, loop.skip_log)), loop.mesh)
    record = {'epoch': epoch, 'train_loss': train_loss, 'lr': lr,
              'step_s': loop.timer.take_epoch(),
              'wall_s': loop.wall_offset + time.time() - loop.t_start, **acc}
    loop.writer.scalars(step, record, jsonl=True)
    loop.skip_log.sync()
    return record


def _train(loop: _Loop, state: TrainState, train_iter, heartbeat: Callable[[], None]) -> None:
    """Steps from `state` to the end: logs, evaluations and checkpoints at their epochs, a
    checkpoint and exit 143 on SIGTERM, a clear stop on a NaN loss."""
    config, workdir, ckpt, steps = loop.config, loop.workdir, loop.ckpt, loop.data.steps
    start_step = int(state.step)
    bar = metrics_io.progress(steps.total, start_step, os.path.basename(workdir.rstrip('/')),
                              enabled=jax.process_index() == 0)
    epoch_losses = []
    with (checkpointing.Preemption(ckpt, jax.process_count()) as preemption,
          checkpointing.saves_completed(ckpt)):
        for step in range(start_step, steps.total):
            state, metrics = loop.step_fn(state, sharding.to_global(next(train_iter), loop.mesh))
            epoch_losses.append(metrics['loss'])
            bar.update(1)
            done = step + 1
            if done % config.log_every_steps == 0 or done == steps.total:
                loss, lr = (float(x) for x in jax.device_get((metrics['loss'], metrics['lr'])))
                step_s = loop.timer.lap(done)
                _check_finite([loss], done, workdir)
                bar.set_postfix(loss=f'{loss:.3f}', lr=f'{lr:.2e}')
                loop.writer.scalars(done, {'train/loss': loss, 'train/lr': lr,
                                           **({'train/step_s': step_s} if step_s else {})})
                heartbeat()
                ckpt.check_saved()      # a background save that failed stops the run now
            if preemption.reached(done):
                # Mid-epoch is fine: the checkpoint holds the data iterator's position.
                _check_finite(jax.device_get(epoch_losses), done - len(epoch_losses) + 1, workdir)
                ckpt.save(done, state, train_iter)
                ckpt.wait_until_finished()
                ckpt.close()
                metrics_io.say(f'{workdir}: preempted (SIGTERM) at step {done}; saved a checkpoint '
                               'there. The same command resumes from it.')
                raise SystemExit(128 + signal.SIGTERM)
            if done % steps.per_epoch == 0:
                epoch = done // steps.per_epoch
                losses = jax.device_get(epoch_losses)
                # Before the checkpoint: a diverged state must never replace the last good one.
                _check_finite(losses, done - len(losses) + 1, workdir)
                train_loss = float(np.mean(losses))
                epoch_losses = []
                if epoch % config.eval.every_epochs == 0 or epoch in loop.last_epochs:
                    record = _evaluate(loop, state, epoch=epoch, step=done, train_loss=train_loss,
                                       lr=float(metrics['lr']))
                    metrics_io.say(f'epoch {epoch}/{config.num_epochs}: train loss '
                                   f'{train_loss:.4f}, top-1 {record["top1"]:.2f}%, top-5 '
                                   f'{record["top5"]:.2f}%')
                if epoch % config.checkpoint.every_epochs == 0 or done == steps.total:
                    ckpt.save(done, state, train_iter)
                loop.timer.restart(done)     # evaluation and saving are not training steps
                bar.unpause()
    bar.close()


def _results(loop: _Loop, source: str, param_counts: dict[str, int]) -> dict[str, Any]:
    """results.json: the last evaluations' mean and std (docs/paper.md §6) and what ran."""
    config, workdir = loop.config, loop.workdir
    records = [r for r in metrics_io.read_metrics(workdir) if r['epoch'] in loop.last_epochs]
    results = {
        **metrics_io.summarize(records, len(loop.last_epochs)),
        'num_frozen': config.transfer.num_frozen,
        'frozen_bn': config.transfer.frozen_bn,
        'reinit': config.transfer.reinit,
        'model': config.model.name,
        'train_data': config.data.train,
        'eval_data': f'{config.data.eval}:{config.data.eval_split}',
        'source': source,
        'source_data': config.transfer.source_data,
        'epochs': config.num_epochs,
        'steps': loop.data.steps.total,
        'train_examples': loop.data.num_train,
        'train_fraction': config.data.train_fraction,
        'skipped_records': reader.count_skipped(workdir),
        'global_batch': config.global_batch,
        **param_counts,
        'wall_seconds': loop.wall_offset + time.time() - loop.t_start,
    }
    fileio.write_json(os.path.join(workdir, 'results.json'), results)
    return results


class _StepTimer:
    """Seconds per training step, measured between log points (where the loss is fetched,
    so the device has finished those steps). The first interval of a process is left out: it
    holds compilation and the loader's start."""

    def __init__(self, step: int):
        self._first = True
        self._epoch: list[float] = []
        self.restart(step)

    def restart(self, step: int) -> None:
        self._time, self._step = time.perf_counter(), step

    def lap(self, step: int) -> float | None:
        """Seconds per step since the last lap or restart; None for the first interval."""
        now = time.perf_counter()
        seconds = (now - self._time) / max(1, step - self._step)
        self._time, self._step = now, step
        if self._first:
            self._first = False
            return None
        self._epoch.append(seconds)
        return seconds

    def take_epoch(self) -> float | None:
        """The median of the laps since the last call (metrics.jsonl's `step_s`)."""
        laps, self._epoch = self._epoch, []
        return float(np.median(laps)) if laps else None


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _check_finite(losses, first_step: int, workdir: str) -> None:
    """Raises FloatingPointError naming the first step (numbered from 1) whose loss is NaN or
    infinite; `losses` are consecutive steps' losses from `first_step` on."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(losses, dtype=np.float64)))
    if bad.size:
        step = first_step + int(bad[0])
        raise FloatingPointError(
            f'Loss is {float(np.asarray(losses)[bad[0]])} at step {step} of {workdir}: training '
            f'diverged. The last good checkpoint is kept in {workdir}/checkpoints; lower '
            '--config.optim.base_lr or check the data, then run the same command to resume '
            'from it.')
