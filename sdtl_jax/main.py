r"""One experiment or study: `python -m sdtl_jax.main --config=configs/X.py[:args] --workdir=DIR`.

`--config.key=value` overrides any value; the config is locked, so a misspelt key is an error.
Re-running the same command resumes from the workdir's latest checkpoint. A study config
(`configs/study/*.py`) runs all its experiments, one sub-folder each, then writes its report.
"""

import json
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sdtl_jax import cli
from sdtl_jax.errors import UserError

flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and results go.',
                    required=True)
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not FLAGS['verbosity'].present:
        # Orbax and grain log every save and read at INFO; status lines come from train.py.
        logging.set_verbosity(logging.WARNING)
    # Imported after flag parsing so `--help` stays fast and XLA flags from the environment apply.
    import jax

    import sdtl_jax
    from sdtl_jax import config_lib, experiment, metrics_io, study

    sdtl_jax.use_compilation_cache()

    # Multi-host (TPU pods, SLURM): the launcher sets SDTL_MULTIHOST=1; on a single host the
    # call would fail on CPU, so it is opt-in, as in big_vision. Where JAX cannot detect the
    # cluster, JAX_COORDINATOR_ADDRESS, SDTL_NUM_PROCESSES and SDTL_PROCESS_ID describe it.
    if os.environ.get('SDTL_MULTIHOST') == '1':
        explicit = {k: int(os.environ[v]) for k, v in (('num_processes', 'SDTL_NUM_PROCESSES'),
                                                       ('process_id', 'SDTL_PROCESS_ID'))
                    if v in os.environ}
        jax.distributed.initialize(**explicit)
    metrics_io.say(f'JAX {jax.__version__}: {jax.process_count()} process(es), '
                   f'{jax.device_count()} {jax.devices()[0].platform} device(s)')
    # Config errors as one line, before any data is read or program compiled: `experiment.run`
    # validates the config (the target stage's too) before a transfer's source stage trains,
    # and `study.run` every run's before the first.
    try:
        if config_lib.is_study(FLAGS.config):
            study.run(FLAGS.config, FLAGS.workdir)      # prints where its report went
            return
        results = experiment.run(FLAGS.config, FLAGS.workdir)
    except config_lib.ConfigError as e:
        sys.exit(f'FATAL config error: {e}')
    except UserError as e:
        # Every process exits 1; one line from process 0 is enough, not one per host.
        sys.exit(f'FATAL {e}' if jax.process_index() == 0 else 1)
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2, sort_keys=True))


def parse_flags(argv):
    """absl's flag parsing (`cli.parse_flags`: --help exits 0), but two errors are one line:
    a UserError from the config file's `get_config(arg)` (a misspelt `:arg`), and a
    `--config.key` that the config lacks, named with the closest key and the section's keys:
    ml_collections raises a bare KeyError or AttributeError from inside absl's parser, which
    absl shows as a long traceback."""
    path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    try:
        return cli.parse_flags(argv)
    except UserError as e:
        sys.exit(f'FATAL Flags parsing error: --config={path}: {e}')
    except (KeyError, AttributeError):
        if path is None:
            raise
        # Imported here: it imports JAX, which `--help` should not wait for.
        from sdtl_jax import config_check

        config = FLAGS['config'].parser.parse(path)     # the config file without overrides
        try:
            config_check.check_overrides(config, [m[1] for a in argv if (
                m := re.match(r'--?(?:no)?config\.([^=]+)', a))])
        except ValueError as e:
            sys.exit(f'FATAL Flags parsing error: {e}')
        raise


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
