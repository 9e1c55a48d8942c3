r"""Runs a study on a SLURM cluster: one job array per stage, then a job that writes the report.

  python launch/study_slurm.py --config=configs/study/layers.py --workdir=/shared/sdtl/layers \
      --partition=gpu --gpus=1 --time=24:00:00 [--max_parallel=8] [--dry_run]
  python launch/study_slurm.py --config=configs/study/layers.py --workdir=/shared/sdtl/layers \
      --status

Loads the study config as main.py does (`path.py:args`, then the `--config.key=value` overrides),
expands it into runs (`study.expand`) and groups them into stages (`study.stages`): first the
baselines the transfers start from, then the transfers. Each stage becomes one `sbatch --array`,
one array task per run, each running

  cd REPO && .venv/bin/python -m sdtl_jax.main --config=CONFIG --workdir=WORKDIR \
      --config.study.only=<its run> --config.study.report=False [the --config.* overrides]

Stage 2's array waits for stage 1's (--dependency=afterok:<array>), and a last job runs
`python -m sdtl_jax.report --workdir=WORKDIR` once every run succeeded. Jobs are named
sdtl-<WORKDIR's last folder>-stage<k> and -report (`scancel --name=...` stops a study). A task
of --nodes=N > 1 nodes joins its nodes through jax.distributed, as launch/train_slurm.sh does.

Preemption: tasks are submitted with --requeue and --signal=B:TERM@GRACE. The batch script
passes SIGTERM on to the run, which saves a checkpoint and exits with status 143; the script
then requeues its own task (`scontrol requeue`), which resumes from that checkpoint. Set --time
and --grace so that a run that reaches the time limit gets requeued the same way.

WORKDIR must be storage every node and this machine see, under the same path (an absolute path
on a shared filesystem, or gs://); task logs go to WORKDIR/logs (the submit directory for gs://).
Re-running the same command submits only what is missing: runs with a results.json are skipped,
and runs whose task from an earlier submission is still queued or running are waited for, not
submitted again (WORKDIR/slurm_jobs.json records the tasks). --status prints each run's state:
its workdir's (finished, started, not started) and its task's (from sacct, or scontrol where
the cluster keeps no accounting). --dry_run prints the submission as a shell script.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import posixpath
import shlex
import subprocess
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import sweep  # noqa: E402  (launch/ is not a package; sweep's loading and checks are reused)

from sdtl_jax import fileio, metrics_io  # noqa: E402
from sdtl_jax.errors import UserError  # noqa: E402

ROOT = sweep.ROOT
UsageError = sweep.UsageError
JOBS_FILE = 'slurm_jobs.json'       # {run: the array task that runs it, e.g. "1234_5"}
ACTIVE_STATES = {'PENDING', 'RUNNING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'CONFIGURING',
                 'COMPLETING', 'RESIZING', 'SUSPENDED', 'PREEMPTED', 'STOPPED', 'SIGNALING'}


def define_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    config_flags.DEFINE_config_file('config', None, 'Study config: configs/study/X.py[:args].',
                                    flag_values=fv, lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string('workdir', None, 'Study workdir that every node and this machine see: '
                        'gs://BUCKET/... or an absolute path on a shared filesystem.',
                        flag_values=fv)
    flags.DEFINE_string('partition', None, 'sbatch --partition.', flag_values=fv)
    flags.DEFINE_string('account', None, 'sbatch --account.', flag_values=fv)
    flags.DEFINE_integer('gpus', 0, 'GPUs per node of each task (0: ask for none).',
                         flag_values=fv)
    flags.DEFINE_integer('nodes', 1, 'Nodes per task; > 1 joins them with jax.distributed.',
                         flag_values=fv)
    flags.DEFINE_string('time', None, 'sbatch --time of each task, e.g. 24:00:00.',
                        flag_values=fv)
    flags.DEFINE_integer('max_parallel', 0, 'At most this many tasks of a stage at once (the '
                         'array\'s %N throttle; 0: no limit).', flag_values=fv)
    flags.DEFINE_integer('grace', 300, 'Seconds before the time limit at which a task gets '
                         'SIGTERM (saves a checkpoint and requeues itself).', flag_values=fv)
    flags.DEFINE_string('sbatch_args', '', 'More sbatch options for every job, e.g. '
                        '"--qos=high --constraint=a100".', flag_values=fv)
    flags.DEFINE_bool('dry_run', False, 'Print the submission as a shell script; submit nothing.',
                      flag_values=fv)
    flags.DEFINE_bool('status', False, 'Print each run\'s state; submit nothing.',
                      flag_values=fv)


@dataclasses.dataclass(frozen=True)
class Options:
    """What every job's batch script needs, from the flags."""
    config: str                 # relative to ROOT when inside this checkout
    workdir: str
    overrides: tuple[str, ...]
    python: str
    partition: str | None = None
    account: str | None = None
    gpus: int = 0
    nodes: int = 1
    time: str | None = None
    max_parallel: int = 0
    grace: int = 300
    name: str = 'sdtl-study'     # job names: <name>-stage<k>, <name>-report

    @property
    def logdir(self) -> str | None:
        return None if fileio.is_remote(self.workdir) else os.path.join(self.workdir, 'logs')


def repo_python() -> str:
    """As launch/common.bash's repo_python: PYTHON, else the .venv of this checkout."""
    if os.environ.get('PYTHON'):
        return os.environ['PYTHON']
    venv = ROOT / '.venv' / 'bin' / 'python'
    return str(venv) if venv.exists() else 'python3'


def _common_headers(o: Options, job_name: str) -> list[str]:
    lines = [f'--job-name={job_name}']
    lines += [f'--partition={o.partition}'] if o.partition else []
    lines += [f'--account={o.account}'] if o.account else []
    return lines


def task_command(o: Options) -> str:
    """What one array task runs; $run is its run's name (set by the script)."""
    argv = [o.python, '-m', 'sdtl_jax.main', f'--config={o.config}', f'--workdir={o.workdir}']
    main = shlex.join(argv) + ' --config.study.only="$run" --config.study.report=False'
    if o.overrides:
        main += ' ' + shlex.join(o.overrides)
    if o.nodes == 1:
        return main
    # As launch/train_slurm.sh: one process per node, joined by jax.distributed; SLURM_PROCID
    # differs per task, so it is read inside each task.
    return ('srun --label --kill-on-bad-exit=1 bash -c \'export SDTL_PROCESS_ID=$SLURM_PROCID; '
            'exec "$@"\' task \\\n  ' + main)


def _multihost_setup(o: Options) -> str:
    if o.nodes == 1:
        return ''
    return ('mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")\n'
            'export JAX_COORDINATOR_ADDRESS=${hosts[0]}:$((61440 + SLURM_JOB_ID % 4096))\n'
            'export SDTL_MULTIHOST=1 SDTL_NUM_PROCESSES=$SLURM_NTASKS\n')


def array_script(o: Options, runs: Sequence[str], stage: int) -> str:
    """The batch script of one stage: array task i runs runs[i]."""
    headers = _common_headers(o, f'{o.name}-stage{stage}')
    throttle = f'%{o.max_parallel}' if o.max_parallel else ''
    headers += [f'--array=0-{len(runs) - 1}{throttle}', f'--nodes={o.nodes}',
                '--ntasks-per-node=1', '--requeue', f'--signal=B:TERM@{o.grace}',
                '--open-mode=append']
    headers += [f'--gpus-per-node={o.gpus}'] if o.gpus else []
    headers += [f'--time={o.time}'] if o.time else []
    headers += [f'--output={o.logdir}/slurm-%A_%a.log'] if o.logdir else []
    return f'''#!/usr/bin/env bash
{chr(10).join(f"#SBATCH {h}" for h in headers)}
set -uo pipefail
cd {shlex.quote(str(ROOT))}
runs=({" ".join(shlex.quote(r) for r in runs)})
run=${{runs[$SLURM_ARRAY_TASK_ID]}}
echo "study_slurm: run $run, task ${{SLURM_ARRAY_JOB_ID}}_$SLURM_ARRAY_TASK_ID" \\
     "(job $SLURM_JOB_ID), start $((${{SLURM_RESTART_COUNT:-0}} + 1))"
{_multihost_setup(o)}# In the background: --signal=B:TERM signals this shell; the trap passes it on.
{task_command(o)} &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM
status=0
wait "$child" || status=$?
# A TERM interrupts `wait`: wait again for the run's own exit status, once it saved a checkpoint.
while [ "$status" -gt 128 ] && kill -0 "$child" 2>/dev/null; do
  status=0
  wait "$child" || status=$?
done
if [ "$status" = 143 ]; then
  # Preempted: the checkpoint is saved; the requeued task resumes from it (a failure would
  # stop the stages after this one).
  echo "study_slurm: run $run stopped by SIGTERM after saving a checkpoint; requeueing"
  for attempt in 1 2 3 4 5; do          # a busy slurmctld may time out: try again
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    sleep $((attempt * 5))
  done
  echo "study_slurm: could not requeue task $SLURM_JOB_ID; resubmit the study to resume $run"
fi
exit "$status"
'''


def report_script(o: Options) -> str:
    headers = _common_headers(o, f'{o.name}-report') + ['--nodes=1', '--ntasks=1']
    headers += [f'--output={o.logdir}/slurm-%j-report.log'] if o.logdir else []
    report = shlex.join([o.python, '-m', 'sdtl_jax.report', f'--workdir={o.workdir}'])
    return (f'#!/usr/bin/env bash\n{chr(10).join(f"#SBATCH {h}" for h in headers)}\n'
            f'set -euo pipefail\ncd {shlex.quote(str(ROOT))}\n{report}\n')


def sbatch_argv(extra: str, dependencies: Sequence[str]) -> list[str]:
    argv = ['sbatch', '--parsable', *shlex.split(extra)]
    if dependencies:
        argv.append('--dependency=afterok:' + ':'.join(dependencies))
    return argv


def dry_run_sbatch(extra: str, dependencies: Sequence[str]) -> str:
    """The sbatch command line of the dry run, where a dependency may be a shell $variable."""
    line = shlex.join(sbatch_argv(extra, []))
    return line + (' --dependency=afterok:' + ':'.join(dependencies) if dependencies else '')


def submit(argv: Sequence[str], script: str) -> str:
    """Submits `script`; its job id."""
    try:
        done = subprocess.run(argv, input=script, capture_output=True, text=True, check=False)
    except OSError as e:
        raise UsageError(f'cannot run sbatch ({e}); run this on a SLURM login node') from None
    if done.returncode:
        raise UsageError(f'sbatch failed: {done.stderr.strip() or done.stdout.strip()}')
    return done.stdout.strip().split(';')[0]


def _jobs_path(workdir: str) -> str:
    return os.path.join(workdir, JOBS_FILE)


def read_jobs(workdir: str) -> dict[str, str]:
    path = _jobs_path(workdir)
    return metrics_io.read_json(path) if fileio.exists(path) else {}


def _task_state_from_sacct(task: str) -> str | None:
    try:
        done = subprocess.run(['sacct', '-n', '-P', '-X', '-j', task, '-o', 'State'],
                              capture_output=True, text=True, check=False)
    except OSError:
        return None
    states = done.stdout.split()
    return states[-1] if done.returncode == 0 and states else None


def _task_state_from_scontrol(task: str) -> str | None:
    try:
        done = subprocess.run(['scontrol', 'show', 'job', '-o', task], capture_output=True,
                              text=True, check=False)
    except OSError:
        return None
    for word in done.stdout.split():
        if word.startswith('JobState='):
            return word.removeprefix('JobState=')
    return None


def task_state(task: str) -> str:
    """The state SLURM reports for an array task: sacct's, else (no accounting, or the task is
    too recent for it) scontrol's; 'unknown' once neither remembers it."""
    return _task_state_from_sacct(task) or _task_state_from_scontrol(task) or 'unknown'


def run_state(workdir: str, run: str) -> str:
    run_dir = os.path.join(workdir, run)
    if fileio.exists(os.path.join(run_dir, 'results.json')):
        return 'finished'
    return 'started' if fileio.exists(run_dir) else 'not started'


def show_status(workdir: str, stages: Sequence[Sequence[str]]) -> int:
    jobs = read_jobs(workdir)
    for i, stage in enumerate(stages, 1):
        print(f'stage {i}/{len(stages)}:')
        for run in stage:
            task = jobs.get(run)
            slurm = f'task {task} {task_state(task)}' if task else 'never submitted'
            print(f'  {run:<16} {run_state(workdir, run):<12} {slurm}')
    return 0


def plan(workdir: str, stages: Sequence[Sequence[str]]
         ) -> tuple[list[list[str]], list[dict[str, str]]]:
    """What to submit: each stage's runs that are neither finished nor still queued or running
    from an earlier submission; and, per stage, those still-active runs' tasks (to wait for)."""
    jobs = read_jobs(workdir)
    active = {run: task for run, task in jobs.items() if task_state(task) in ACTIVE_STATES}
    todo = [[r for r in stage if run_state(workdir, r) != 'finished' and r not in active]
            for stage in stages]
    return todo, [{r: active[r] for r in stage if r in active} for stage in stages]


def launch(o: Options, fv: flags.FlagValues, stages: list[list[str]], write_report: bool) -> int:
    """Submits (or, --dry_run, prints) each stage's missing runs as one array that waits for
    every earlier stage: its array from this submission, and its tasks still queued or running
    from an earlier one (by task, so an earlier array's failed task does not block it)."""
    todo, active = plan(o.workdir, stages)
    jobs = read_jobs(o.workdir)
    if fv.dry_run and o.logdir:
        print(f'mkdir -p {shlex.quote(o.logdir)}')
    elif o.logdir:
        fileio.makedirs(o.logdir)
    waits_for: list[str] = []
    for i, (runs, earlier) in enumerate(zip(todo, active), 1):
        comment = '# ' if fv.dry_run else ''
        for run, task in earlier.items():
            print(f'{comment}{run}: still queued or running in task {task} from an earlier '
                  'submission; waiting for it')
        depends_on, waits_for = waits_for, waits_for + list(earlier.values())
        if not runs:
            print(f'{comment}stage {i}/{len(todo)}: nothing to submit (finished or queued)')
            continue
        script = array_script(o, runs, i)
        if fv.dry_run:
            print(f'# stage {i}/{len(todo)}: {len(runs)} runs, one array task each')
            print(f'stage{i}=$({dry_run_sbatch(fv.sbatch_args, depends_on)} <<\'SCRIPT\'\n'
                  f'{script}SCRIPT\n)')
            waits_for.append(f'$stage{i}')
            continue
        job = submit(sbatch_argv(fv.sbatch_args, depends_on), script)
        jobs.update({run: f'{job}_{k}' for k, run in enumerate(runs)})
        fileio.write_json(_jobs_path(o.workdir), jobs)
        print(f'stage {i}/{len(todo)}: job array {job}, {len(runs)} runs: {", ".join(runs)}')
        waits_for.append(job)
    if not write_report:
        return 0
    if fv.dry_run:
        print(f'# the report, once every run succeeded\n'
              f'{dry_run_sbatch(fv.sbatch_args, waits_for)} <<\'SCRIPT\'\n'
              f'{report_script(o)}SCRIPT')
        return 0
    job = submit(sbatch_argv(fv.sbatch_args, waits_for), report_script(o))
    print(f'report: job {job}')
    return 0


def job_name(workdir: str) -> str:
    """sdtl-<the workdir's last folder>: tells two studies apart in squeue (the stage or
    'report' is appended)."""
    return 'sdtl-' + posixpath.basename(workdir.rstrip('/'))


def options(fv: flags.FlagValues, overrides: list[str]) -> Options:
    if fv.nodes < 1 or fv.gpus < 0 or fv.max_parallel < 0 or fv.grace < 0:
        raise UsageError('--nodes must be >= 1; --gpus, --max_parallel and --grace >= 0')
    return Options(config=sweep.remote_config(fv['config'].config_filename),
                   workdir=fv.workdir.rstrip('/'), overrides=tuple(overrides),
                   python=repo_python(), partition=fv.partition, account=fv.account,
                   gpus=fv.gpus, nodes=fv.nodes, time=fv.time, max_parallel=fv.max_parallel,
                   grace=fv.grace, name=job_name(fv.workdir))


def _parse(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    try:
        rest = fv(list(argv))
    # As sweep.py: config_flags' errors, some with a traceback in the message (its last line).
    except (flags.Error, TypeError, ValueError) as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise UsageError(lines[-1] if lines else repr(e)) from None
    except UserError as e:
        raise UsageError(str(e)) from None
    except (AttributeError, KeyError) as e:
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        raise UsageError(f'unknown --config.* key: {" ".join(str(a) for a in e.args)}') from None
    if len(rest) > 1:
        raise UsageError(f'Unexpected arguments: {rest[1:]}')


def main(argv: Sequence[str]) -> int:
    fv = flags.FlagValues()
    define_flags(fv, argv)
    if {'-h', '--help', '--helpshort', '--helpfull'} & set(argv[1:]):
        print(__doc__)
        print(fv.get_help())
        return 0
    try:
        _parse(fv, argv)
        sweep._check_workdir(fv.workdir)
        stages, write_report = sweep.load_stages(fv)
        if fv.status:
            return show_status(fv.workdir.rstrip('/'), stages)
        return launch(options(fv, sweep.config_overrides(argv, fv)), fv, stages, write_report)
    except UsageError as e:
        print(f'study_slurm: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv))
