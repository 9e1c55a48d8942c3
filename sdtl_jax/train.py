"""The training loop: one jitted, data-parallel step; evaluation each epoch; resume; transfer.

`run` is what `main.py` calls: for a transfer config it first trains (or reuses) the source
model in `<workdir>/source`, then trains the target stage in `<workdir>` with layers [0, N)
taken over from the source and frozen (docs/paper.md §1 and 7).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
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
    run_identity,
    sharding,
    workdir_guard,
)
from sdtl_jax.data import input_pipeline, normalize, photometric, reader, sources, subsets


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       source: str = '') -> dict[str, Any]:
    """Trains one stage per `config` into `workdir`, resuming from its latest checkpoint.

    Restore order (big_vision): the checkpoint in `workdir`, then layers from `source` (a run
    workdir or checkpoints folder) for a transfer, then scratch. Returns results.json's dict.
    Before anything is read or compiled: the config is valid, the workdir writable, not in use
    by another run (process 0 holds its lock until the stage ends), and holds no run of another
    experiment (`run_identity`).
    """
    config_lib.validate(config, num_devices=jax.device_count(),
                        num_processes=jax.process_count())
    fileio.check_supported(workdir)
    move_aside = config.if_config_changed == 'move_aside'
    if jax.process_index() != 0:
        if not move_aside:
            run_identity.check(workdir, config, move_aside=False)   # refuses as process 0 does
        _all_processes_reach('workdir checked')     # process 0 may be moving a run aside
        return _train_and_evaluate(config, workdir, source, heartbeat=lambda: None)
    workdir_guard.check_writable(workdir)
    lock = workdir_guard.RunLock(workdir)
    note = lock.acquire()
    if note:
        metrics_io.say(f'{workdir}: {note}')
    try:
        run_identity.check(workdir, config, move_aside=move_aside)
        _all_processes_reach('workdir checked')
        return _train_and_evaluate(config, workdir, source, heartbeat=lock.heartbeat)
    finally:
        lock.release()


def _all_processes_reach(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, source: str, *,
                        heartbeat: Callable[[], None]) -> dict[str, Any]:
    t_start = time.time()
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh()
    data_dir = config.data.data_dir or sources.default_data_dir()
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
        write=is_main)
    num_train = train_split.num_examples if train_indices is None else len(train_indices)
    steps = config_lib.steps(config, num_train)
    dtype = _dtype(config.dtype)
    num_frozen = config.transfer.num_frozen
    model = models.build(config.model, num_classes=len(train_split.classes),
                         num_frozen=num_frozen, frozen_bn=config.transfer.frozen_bn, dtype=dtype)
    layer_names = model.layer_names()

    # Finished before: reuse (the source stage of a transfer is shared by every N).
    results_path = os.path.join(workdir, 'results.json')
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                      keep=config.checkpoint.keep)
    if fileio.exists(results_path) and ckpt.latest_step() == steps.total:
        metrics_io.say(f'{workdir} is finished; reusing its results')
        ckpt.close()
        return metrics_io.read_json(results_path)

    writer = metrics_io.Writer(workdir, enabled=is_main)
    writer.write_config(config)
    replicated = sharding.replicated(mesh)
    # The transfer stage draws other initial weights than its source did: re-initialised layers
    # must not restart from the source's own initialisation.
    stage_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1 if source else 0)
    init_rng, state_rng = jax.random.split(stage_key)
    variables = jax.jit(functools.partial(models.init, model, image_size=config.aug.global_size),
                        out_shardings=replicated)(init_rng)
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    tx, lr_fn = optim.make(config, params, layer_names, warmup_steps=steps.warmup,
                           total_steps=steps.total)

    process_count, process_index = jax.process_count(), jax.process_index()
    skip_log = reader.SkipLog(workdir, process_index)
    skip = dict(skip_corrupt=config.data.skip_corrupt, skip_log=skip_log.path)
    aug = {**config.aug.to_dict(), 'pixmix_cache_dir': os.path.join(data_dir, 'pixmix_fractals')}
    train_iter = iter(input_pipeline.train_dataset(
        train_split, global_batch=config.global_batch, seed=config.seed, aug=aug,
        process_index=process_index, process_count=process_count,
        num_threads=config.data.num_threads, num_workers=config.data.num_workers,
        indices=train_indices, **skip))

    # One program: made eagerly, the optimizer state compiles a zeros op per parameter shape
    # (~30 compiles, 2-3 s for ResNet-50 at every start; seen in bench.rehearsal's compile log).
    new_state = jax.jit(lambda params, batch_stats: initial_state(params, batch_stats, tx,
                                                                  state_rng),
                        out_shardings=replicated)

    if ckpt.latest_step() is not None:
        state = ckpt.restore(new_state(params, batch_stats), train_iter)
        metrics_io.say(f'Resumed {workdir} at step {int(state.step)}')
    else:
        layers = config_lib.transferred_layers(config, layer_names)
        if source and layers:
            params, batch_stats, source_step = checkpointing.load_for_transfer(
                jax.device_get(params), jax.device_get(batch_stats), source, layers)
            metrics_io.say(f'{workdir}: loaded layers {layers[0]}..{layers[-1]} from {source} '
                           f'(step {source_step}, its last)')
        state = new_state(params, batch_stats)
    if is_main:     # evaluations after the checkpoint resumed from (or all, from scratch)
        metrics_io.cut_metrics(workdir, int(state.step))

    if is_main:
        workdir_guard.check_free_space(workdir, _nbytes(state), config.checkpoint.keep)
    total_params = num_params(state.params)
    trainable_params = num_params({k: v for k, v in state.params.items()
                                   if k not in layer_names[:num_frozen]})
    metrics_io.say(
        f'{workdir}: {config.model.name} on {config.data.train} ({num_train:,} of '
        f'{train_split.num_examples:,} images, {config.aug.name}), {total_params:,} params '
        f'({trainable_params:,} trainable, {num_frozen} of {len(layer_names)} layers frozen), '
        f'global batch {config.global_batch} ({config.global_batch // jax.device_count()} per '
        f'device), {steps.total} steps ({steps.per_epoch} per epoch)')

    step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, lr_fn=lr_fn,
                                        dtype=dtype),
                      donate_argnums=0, out_shardings=(replicated, replicated))
    eval_fn = evaluate.make_eval_fn(model, mesh, dtype)

    def run_eval(epoch: int, step: int, train_loss: float | None, lr: float, wall_offset: float):
        acc = evaluate.accuracy(eval_fn, state.params, state.batch_stats,
                                input_pipeline.eval_batches(
                                    eval_split, global_batch=config.eval.global_batch,
                                    resize=config.eval.resize, crop=config.eval.crop,
                                    process_index=process_index,
                                    process_count=process_count, **skip), mesh)
        record = {'epoch': epoch, 'train_loss': train_loss, 'lr': lr,
                  'step_s': timer.take_epoch(),
                  'wall_s': wall_offset + time.time() - t_start, **acc}
        writer.scalars(step, record, jsonl=True)
        skip_log.sync()
        return record

    previous = metrics_io.read_metrics(workdir) if is_main else []
    wall_offset = previous[-1]['wall_s'] if previous else 0.0
    start_step = int(state.step)
    timer = _StepTimer(start_step)
    last_epochs = range(config.num_epochs - config.eval.last_epochs + 1, config.num_epochs + 1)

    if num_frozen == len(layer_names):
        # N = 18: every layer is taken over; evaluate the pre-trained model untouched.
        run_eval(0, 0, None, 0.0, wall_offset)
        ckpt.save(steps.total, state, train_iter)
        last_epochs = range(0, 1)
        start_step = steps.total

    bar = metrics_io.progress(steps.total, start_step, os.path.basename(workdir.rstrip('/')),
                              enabled=is_main)
    epoch_losses = []
    with _Preemption(ckpt, process_count) as preemption, _saves_completed(ckpt):
        for step in range(start_step, steps.total):
            state, metrics = step_fn(state, sharding.to_global(next(train_iter), mesh))
            epoch_losses.append(metrics['loss'])
            bar.update(1)
            done = step + 1
            if done % config.log_every_steps == 0 or done == steps.total:
                loss, lr = (float(x) for x in jax.device_get((metrics['loss'], metrics['lr'])))
                step_s = timer.lap(done)
                _check_finite([loss], done, workdir)
                bar.set_postfix(loss=f'{loss:.3f}', lr=f'{lr:.2e}')
                writer.scalars(done, {'train/loss': loss, 'train/lr': lr,
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
                if epoch % config.eval.every_epochs == 0 or epoch in last_epochs:
                    record = run_eval(epoch, done, train_loss, float(metrics['lr']), wall_offset)
                    metrics_io.say(f'epoch {epoch}/{config.num_epochs}: train loss '
                                   f'{train_loss:.4f}, top-1 {record["top1"]:.2f}%, top-5 '
                                   f'{record["top5"]:.2f}%')
                if epoch % config.checkpoint.every_epochs == 0 or done == steps.total:
                    ckpt.save(done, state, train_iter)
                timer.restart(done)     # evaluation and saving are not training steps
                bar.unpause()
    bar.close()
    ckpt.wait_until_finished()
    ckpt.close()

    results = {}
    if is_main:
        records = [r for r in metrics_io.read_metrics(workdir) if r['epoch'] in last_epochs]
        results = {
            **metrics_io.summarize(records, len(last_epochs)),
            'num_frozen': num_frozen,
            'frozen_bn': config.transfer.frozen_bn,
            'reinit': config.transfer.reinit,
            'model': config.model.name,
            'train_data': config.data.train,
            'eval_data': f'{config.data.eval}:{config.data.eval_split}',
            'source': source,
            'source_data': config.transfer.source_data,
            'epochs': config.num_epochs,
            'steps': steps.total,
            'train_examples': num_train,
            'train_fraction': config.data.train_fraction,
            'skipped_records': reader.count_skipped(workdir),
            'global_batch': config.global_batch,
            'num_params': total_params,
            'num_trainable_params': trainable_params,
            'wall_seconds': wall_offset + time.time() - t_start,
        }
        metrics_io.write_json(results_path, results)
    writer.close()
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


@contextlib.contextmanager
def _saves_completed(ckpt: checkpointing.Checkpointer):
    """Completes the checkpoints being written (in the background) on the way out, also when
    an exception (a diverged loss, Ctrl-C) ends training: the last good one must be kept."""
    try:
        yield
    finally:
        ckpt.wait_until_finished()


class _Preemption:
    """SIGTERM (a preemption notice): the loop saves a checkpoint and exits.

    One process: a Python handler sets a flag. Several: JAX's coordination service already
    catches SIGTERM and makes all processes agree on a step (Orbax's `reached_preemption`);
    a Python handler would replace its own.
    """

    def __init__(self, ckpt: checkpointing.Checkpointer, process_count: int):
        self._ckpt, self._received = ckpt, False
        # Handlers can only be set from the main thread (not so in some notebook runners).
        self._own_handler = (process_count == 1
                             and threading.current_thread() is threading.main_thread())

    def __enter__(self) -> '_Preemption':
        if self._own_handler:
            self._previous = signal.signal(signal.SIGTERM, self._set)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._own_handler:
            signal.signal(signal.SIGTERM, self._previous)

    def _set(self, signum, frame) -> None:
        self._received = True

    def reached(self, step: int) -> bool:
        return self._received if self._own_handler else self._ckpt.reached_preemption(step)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """One experiment: the source stage if the transfer needs one, then the configured stage."""
    # Before the source stage trains: its config is the target's with valid stand-ins.
    config_lib.validate(config, num_devices=jax.device_count(),
                        num_processes=jax.process_count())
    source = config.transfer.init_from
    # With N = 0 and re-initialisation nothing is taken over: the source stage would be wasted.
    takes_layers = config_lib.transferred_layers(config, range(config_lib.NUM_LAYERS))
    if config.transfer.source_data and not source and takes_layers:
        source = os.path.join(workdir, 'source')
        train_and_evaluate(config_lib.source_stage(config), source)
    return train_and_evaluate(config, workdir, source=source)

