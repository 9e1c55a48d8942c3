r"""Runs a study over several machines that have no scheduler, stage by stage, then writes its
report. A SLURM cluster uses launch/study_slurm.py instead (job arrays, requeue on preemption);
Cloud TPU, one launch/tpu_pod.sh per run or this script's --tpu_names.

  python launch/sweep.py --config=configs/study/layers.py --workdir=/mnt/shared/sdtl/layers \
      --hosts=gpu1,gpu2,gpu3 [--dry_run] [--config.study.num_frozen='(4, 16)']
  python launch/sweep.py --config=configs/study/layers.py:data=pets \
      --workdir=/mnt/shared/sdtl/layers_pets --tpu_names=v4-a,v4-b --zone=us-central2-b

Loads the study config as main.py does (`path.py:args`, then the `--config.key=value` overrides),
expands it into runs (`study.expand`) and groups them into stages (`study.stages`): first the
baselines the transfers start from, then the transfers. Each stage's runs go round-robin to the
hosts; every host with runs gets one invocation of

  cd REPO && .venv/bin/python -m sdtl_jax.main --config=CONFIG --workdir=WORKDIR \
      --config.study.only=<its runs> --config.study.report=False [the --config.* overrides]

all hosts in parallel (`--ssh` HOST for `--hosts`; `gcloud compute tpus tpu-vm ssh NAME
--worker=all` with SDTL_MULTIHOST=1 for `--tpu_names`, one TPU VM or pod slice per "host"). The
next stage starts once every host has finished; a failed host stops the sweep with its name and
runs. Finally `python -m sdtl_jax.report --workdir=WORKDIR` writes the report here.

WORKDIR must be storage that every host and this machine see, the same path everywhere
(gs://BUCKET/..., or an absolute path on a shared filesystem): the transfers of stage 2 read the
baselines of stage 1 from it, and the report reads every run. Each host must hold this
repository at REPO (same commit) with its .venv (`bash scripts/setup.sh`; launch/tpu_pod.sh
leaves one at ~/sdtl_jax). A config path inside this checkout is passed relative to its root.
Re-running the same command resumes: finished runs are reused. `--config.study.only=A,B`
restricts the sweep to those runs; `--config.study.report=False` skips the report.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys
import threading
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from sdtl_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The sweep sets these per host; the user's values choose the runs and the report instead.
OWN_OVERRIDES = ('config.study.only', 'config.study.report')


class UsageError(Exception):
    """Bad input: the message goes to stderr and the sweep exits with status 2."""


def define_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    # config_flags finds the --config.* overrides in sys.argv unless given the argv to parse.
    config_flags.DEFINE_config_file('config', None, 'Study config: configs/study/X.py[:args].',
                                    flag_values=fv, lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string('workdir', None, 'Study workdir that every host and this machine see: '
                        'gs://BUCKET/... or an absolute path on a shared filesystem.',
                        flag_values=fv)
    flags.DEFINE_list('hosts', [], 'Machines to run on, through --ssh.', flag_values=fv)
    flags.DEFINE_list('tpu_names', [], 'Cloud TPU VMs to run on (instead of --hosts), through '
                      'gcloud compute tpus tpu-vm ssh --worker=all.', flag_values=fv)
    flags.DEFINE_string('zone', None, 'Zone of the --tpu_names.', flag_values=fv)
    flags.DEFINE_string('ssh', 'ssh', 'Command that reaches a host, e.g. "ssh -i KEY".',
                        flag_values=fv)
    flags.DEFINE_string('repo', '~/sdtl_jax', 'This repository on every host.', flag_values=fv)
    flags.DEFINE_bool('dry_run', False, 'Print every command, stage by stage; run nothing.',
                      flag_values=fv)


def assign(runs: Sequence[str], hosts: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Round-robin: run i goes to host i % len(hosts); hosts left without runs are left out."""
    shares = {h: list(runs[i::len(hosts)]) for i, h in enumerate(hosts)}
    return [(h, share) for h, share in shares.items() if share]


def _quote_path(path: str) -> str:
    # A leading ~/ must stay unquoted so that the host's shell expands it to its own home.
    if path.startswith('~/'):
        return '~/' + shlex.quote(path[2:])
    return shlex.quote(path)


def remote_command(*, repo: str, config: str, workdir: str, only: Sequence[str],
                   overrides: Sequence[str], multihost: bool = False) -> str:
    """The shell command one host runs: its share of a stage, without the report."""
    argv = ['.venv/bin/python', '-m', 'sdtl_jax.main', f'--config={config}',
            f'--workdir={workdir}', f'--config.study.only={",".join(only)}',
            '--config.study.report=False', *overrides]
    env = 'SDTL_MULTIHOST=1 ' if multihost else ''
    return f'cd {_quote_path(repo)} && {env}{shlex.join(argv)}'


def host_argv(host: str, command: str, *, ssh: str = 'ssh', zone: str | None = None) -> list[str]:
    """The local command that runs `command` on `host` (a TPU VM's name when `zone` is set)."""
    if zone:
        return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', host, f'--zone={zone}',
                '--worker=all', f'--command={command}']
    return [*shlex.split(ssh), host, command]


def config_overrides(argv: Sequence[str], fv: flags.FlagValues) -> list[str]:
    """The --config.key=value flags of `argv`, as main.py takes them (always with '=')."""
    out, args = [], iter(argv[1:])
    for arg in args:
        if arg == '--':
            break
        name, sep, _ = arg.lstrip('-').partition('=')
        key = name[2:] if name.startswith('noconfig.') else name
        if not arg.startswith('-') or not key.startswith('config.'):
            continue
        if not sep and not fv[key].boolean:    # `--config.seed 1`: the value is the next arg
            arg = f'--{name}={next(args)}'
        if key not in OWN_OVERRIDES:
            out.append(arg)
    return out


def remote_config(config_arg: str) -> str:
    """`config_arg` with a path inside this checkout made relative to its root (= REPO there)."""
    path, sep, args = config_arg.partition(':')
    full = pathlib.Path(path).resolve()
    if full.is_relative_to(ROOT):
        path = str(full.relative_to(ROOT))
    return path + sep + args


def _check_workdir(workdir: str | None) -> None:
    if not workdir:
        raise UsageError('--workdir is required')
    if not (workdir.startswith('gs://') or os.path.isabs(workdir)):
        raise UsageError(f'--workdir={workdir} must be storage every host sees, under the same '
                         'path: gs://BUCKET/... or an absolute path on a shared filesystem')


def _targets(fv: flags.FlagValues) -> tuple[list[str], str | None]:
    hosts = [h for h in fv.hosts if h]
    tpus = [t for t in fv.tpu_names if t]
    if bool(hosts) == bool(tpus):
        raise UsageError('Give the machines to run on: --hosts=h1,h2,... or '
                         '--tpu_names=NAME1,...  --zone=ZONE (one of the two)')
    if tpus and not fv.zone:
        raise UsageError('--tpu_names needs --zone')
    names = hosts or tpus
    if twice := sorted({h for h in names if names.count(h) > 1}):
        raise UsageError(f'{"--hosts" if hosts else "--tpu_names"} lists {twice} twice')
    return names, fv.zone if tpus else None


def _count(n: int, noun: str) -> str:
    return f'{n} {noun}{"" if n == 1 else "s"}'


def _stream(prefix: str, pipe) -> None:
    for line in pipe:
        sys.stdout.write(f'{prefix}{line}')
        sys.stdout.flush()


def run_parallel(jobs: Sequence[tuple[str, list[str]]]) -> dict[str, int]:
    """Runs each (host, argv) at once, output prefixed by its host; {host: exit status}."""
    procs, threads = {}, []
    try:
        for host, argv in jobs:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)
            except OSError as e:
                raise UsageError(f'cannot start {argv[0]} for {host}: {e}') from None
            procs[host] = proc
            threads.append(threading.Thread(target=_stream, args=(f'[{host}] ', proc.stdout)))
            threads[-1].start()
        status = {host: proc.wait() for host, proc in procs.items()}
    except BaseException:     # Ctrl-C included: leave no launcher process behind
        for proc in procs.values():
            proc.terminate()
        raise
    for t in threads:
        t.join()
    return status


def main(argv: Sequence[str]) -> int:
    fv = flags.FlagValues()
    define_flags(fv, argv)
    if {'-h', '--help', '--helpshort', '--helpfull'} & set(argv[1:]):
        print(__doc__)
        print(fv.get_help())
        return 0
    try:
        try:
            rest = fv(list(argv))
        # config_flags raises the config's own errors (a misspelt --config.key, a bad :arg),
        # some with a whole traceback in the message: its last line says what is wrong.
        except (flags.Error, TypeError, ValueError) as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise UsageError(lines[-1] if lines else repr(e)) from None
        except UserError as e:                      # a misspelt :arg, named in one line
            raise UsageError(str(e)) from None
        except (AttributeError, KeyError) as e:     # a --config.key the config lacks
            while e.args and isinstance(e.args[0], BaseException):
                e = e.args[0]
            raise UsageError(f'unknown --config.* key: {" ".join(str(a) for a in e.args)}'
                             ) from None
        if len(rest) > 1:
            raise UsageError(f'Unexpected arguments: {rest[1:]}')
        return sweep(fv, config_overrides(argv, fv))
    except UsageError as e:
        print(f'sweep: {e}', file=sys.stderr)
        return 2


def load_stages(fv: flags.FlagValues) -> tuple[list[list[str]], bool]:
    """The names of the study's runs to sweep, stage by stage, and whether to write the report."""
    if fv['config'].value is None:
        raise UsageError('--config=configs/study/X.py[:args] is required')
    try:
        config = fv.config
        is_study = 'study' in config
    except OSError as e:      # config_flags defers a missing file's error to the first access
        raise UsageError(f'--config={fv["config"].config_filename}: cannot load it ({e})') from None
    if not is_study:
        raise UsageError(f'--config={fv["config"].config_filename} is not a study config (no '
                         'config.study); run one experiment with sdtl_jax.main or a launcher')
    from sdtl_jax import study  # imports jax: after the checks, so bad input fails fast

    try:
        runs = study.expand(config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    only = {n.strip() for n in config.study.only.split(',') if n.strip()}
    stages = [[r.name for r in stage if not only or r.name in only]
              for stage in study.stages(runs)]
    return [s for s in stages if s], config.study.report


def sweep(fv: flags.FlagValues, overrides: list[str]) -> int:
    """Runs (or prints, with --dry_run) every stage, then the report."""
    _check_workdir(fv.workdir)
    hosts, zone = _targets(fv)
    stages, write_report = load_stages(fv)
    config_arg = remote_config(fv['config'].config_filename)
    say = (lambda line: print(f'# {line}')) if fv.dry_run else print
    for i, stage in enumerate(stages, 1):
        shares = assign(stage, hosts)
        say(f'stage {i}/{len(stages)}: {_count(len(stage), "run")} on '
            f'{_count(len(shares), "host")}')
        jobs = []
        for host, names in shares:
            command = remote_command(repo=fv.repo, config=config_arg, workdir=fv.workdir,
                                     only=names, overrides=overrides, multihost=bool(zone))
            jobs.append((host, host_argv(host, command, ssh=fv.ssh, zone=zone)))
            if not fv.dry_run:
                print(f'  {host}: {", ".join(names)}')
        if fv.dry_run:
            for _, argv in jobs:
                print(f'{shlex.join(argv)} &')
            print('wait')
            continue
        status = run_parallel(jobs)
        failed = [(host, names) for host, names in shares if status[host]]
        if failed:
            for host, names in failed:
                print(f'sweep: stage {i}/{len(stages)} failed on {host} (exit status '
                      f'{status[host]}) running {", ".join(names)}', file=sys.stderr)
            print('sweep: stopped before the next stage; re-run the same command to resume '
                  '(finished runs are reused)', file=sys.stderr)
            return 1
    report = [sys.executable, '-m', 'sdtl_jax.report', f'--workdir={fv.workdir}']
    num_runs = sum(map(len, stages))
    if not write_report:
        say(f'{num_runs} runs; no report (--config.study.report=False)')
        return 0
    say(f'report of the study ({num_runs} runs of it swept)')
    if fv.dry_run:
        print(shlex.join(report))
        return 0
    return subprocess.run(report, check=False).returncode


if __name__ == '__main__':
    sys.exit(main(sys.argv))
