"""`python tests/interrupt_run.py POINT K [sdtl_jax.main flags]`: runs `python -m sdtl_jax.main`
and interrupts it at the K-th time it reaches POINT, as a preemption or a crash would:

  step     SIGKILL before the K-th training step (its batch already read)
  save     SIGKILL just after the K-th checkpoint save started (Orbax writes in the background)
  eval     SIGKILL after the first batch of the K-th evaluation
  sigterm  SIGTERM before the K-th training step (a preemption notice)

Only the test harness (tests/test_resume.py) uses it: the package has no kill hooks.
"""
import os
import signal
import sys

from absl import app

from sdtl_jax import checkpointing, evaluate, main, sharding

POINTS = ('step', 'save', 'eval', 'sigterm')


def interrupt_at(point: str, k: int) -> None:
    count = 0

    def reached() -> None:
        nonlocal count
        count += 1
        if count == k:
            os.kill(os.getpid(), signal.SIGTERM if point == 'sigterm' else signal.SIGKILL)

    if point in ('step', 'sigterm'):
        to_global = sharding.to_global

        def to_global_then_interrupt(batch, mesh):
            if 'global' in batch:                        # a training batch, not evaluation's
                reached()
            return to_global(batch, mesh)
        sharding.to_global = to_global_then_interrupt
    elif point == 'save':
        save = checkpointing.Checkpointer.save

        def save_then_interrupt(self, *args, **kwargs):
            save(self, *args, **kwargs)
            reached()
        checkpointing.Checkpointer.save = save_then_interrupt
    elif point == 'eval':
        accuracy = evaluate.accuracy

        def accuracy_interrupted(eval_fn, params, batch_stats, batches, mesh):
            def first_then_interrupt():
                for i, batch in enumerate(batches):
                    yield batch
                    if i == 0:
                        reached()
            return accuracy(eval_fn, params, batch_stats, first_then_interrupt(), mesh)
        evaluate.accuracy = accuracy_interrupted
    else:
        raise SystemExit(f'POINT must be one of {POINTS}, not {point!r}')


if __name__ == '__main__':
    interrupt_at(sys.argv[1], int(sys.argv[2]))
    app.run(main.main, argv=[sys.argv[0], *sys.argv[3:]], flags_parser=main.parse_flags)
