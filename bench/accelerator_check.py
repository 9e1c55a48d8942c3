r"""The accelerator check (issue 13): our tests and benchmarks on a lent GPU, in one command.

  python3 -m bench.accelerator_check          # on the GPU machine, as bench/README.md says
  python -m bench.accelerator_check --tiny    # every part at a tiny size, on this CPU

Made for a machine lent for one call of at most 8 minutes, without a network and without some
of our dependencies. First, the wheels that bench/accelerator_wheels.sh put in .whl/ and that
this Python lacks (or has at another version) are installed into --site, which goes first on
the parts' PYTHONPATH. Then the parts run in this order, each in a process of its own within
its time budget (PART_SECONDS); a part that fails or runs out of time is recorded as such,
with the figures it printed until then, and the next one runs:

- tests: the test files of the models, the train step, the optimizer, training end to end
  (checkpoints, transfer) and the generator, on the GPU (JAX_PLATFORMS=cuda; pytest workers
  share it, so neither JAX nor PyTorch takes its memory up front);
- train_step: `bench.train_step_speed --full_size` for ResNet-50 and TinyViT-5M at N = 0 and
  16, ours against the PyTorch reference (the goals' figures, so it runs early); it prints each
  figure as it is measured, so a cut run still records the ones it made;
- generator: `bench.generator_speed --random_sd14`: SD 1.4's architecture with random weights
  at 512 x 384 and 50 steps, our batched generator against the naive one-prompt loop;
- loader: `bench.loader_speed` with the config's workers, one per CPU core, and one
  10,000 x 10,000 JPEG.
The sharded step is not among them: one GPU cannot shard, and CI runs that test on 8
simulated CPU devices.

The summary (device, versions, commit, each part's figures or failure) is printed; where the
environment variable OUT is set (the device tool brings back what is written there), it is
also written there as a bench/RESULTS.md section, accelerator_check.md, with the whole log,
accelerator_check.log. `--append` appends the section to bench/RESULTS.md. `--tiny` runs each
part at a tiny size on the CPU (tests/test_accelerator_check.py): it checks the code, and its
figures mean nothing.
"""

from __future__ import annotations

import collections
import glob
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata

from absl import app, flags

from bench import results
from sdtl_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(ROOT, '.whl')
PARTS = ('tests', 'train_step', 'generator', 'loader')
# Each part's time limit in seconds, on the GPU machine and at --tiny on a 2-core CPU (there
# only a guard against a hang); each also stops where --total_s runs out. The train step is 8
# fresh processes (2 models x 2 N x ours and PyTorch), each compiling or autotuning first.
PART_SECONDS = {'tests': (60, 600), 'train_step': (270, 600), 'generator': (80, 600),
                'loader': (30, 600)}
# What the tests part runs on the GPU, a pytest worker per file: the models, the train step, the
# optimizer, the generator, and training end to end: a run that checkpoints, then a transfer
# from its checkpoint (the rest of test_train.py took 3 times as long on a CPU).
GPU_TESTS = ('tests/test_models.py', 'tests/test_train_step.py', 'tests/test_optim.py',
             'tests/test_generate.py',
             'tests/test_train.py::test_transfer_keeps_frozen_layers_bit_identical')
TINY_TESTS = ('tests/test_optim.py',)
# Each benchmark's flags: (on the GPU machine, at --tiny).
BENCH_ARGS = {
    'generator': ('bench.generator_speed', (
        ['--random_sd14', '--images=48', '--naive_images=6', '--batch_size=16'],
        ['--tiny', '--width=64', '--height=48', '--steps=2', '--images=2', '--naive_images=1',
         '--batch_size=2'])),
    'loader': ('bench.loader_speed', (
        ['--large_jpeg'], ['--settings=0:1', '--num_images=8', '--batch=4', '--num_batches=1',
             '--repeats=1'])),
    'train_step': ('bench.train_step_speed', (
        ['--full_size', '--models=resnet50,tinyvit_5m', '--num_frozen=0,16'],
        ['--small', '--models=resnet50', '--num_frozen=16', '--batch=2', '--global_size=32',
         '--num_local=2', '--local_size=16', '--warmup=1', '--repeats=1'])),
}
# Library versions the header (bench.all's) leaves out.
MORE_VERSIONS = ('transformers', 'huggingface-hub', 'orbax-checkpoint', 'jax-cuda13-plugin',
                 'opencv-python-headless')
_CHILD = '--accelerator_check_child'   # argv[1] of a part's process (see `_child`)
_MARK = 'ACCELERATOR_CHECK_LINES '     # marks the line that holds a child's figures


class Log:
    """Prints lines and, with a path, writes them to a file too; safe across threads."""

    def __init__(self, path: str | None = None):
        self._file = open(path, 'w') if path else None
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            print(line, flush=True)
            if self._file:
                self._file.write(line + '\n')
                self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def _normalize(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def _versions(paths: list[str]) -> dict[str, str]:
    """{normalized distribution name: version}, the first found along `paths`, as imports go."""
    found = {}
    for dist in metadata.distributions(path=paths):
        found.setdefault(_normalize(dist.metadata['Name']), dist.version)
    return found


def install_wheels(site: str, log: Log) -> tuple[list[str], str]:
    """Installs into `site` the wheels of .whl/ whose distribution this Python lacks or has at
    another version. Returns (what to put first on PYTHONPATH, a line for the summary)."""
    wheels = {}
    for path in sorted(glob.glob(os.path.join(WHEELS, '*.whl'))):
        name, version = os.path.basename(path).split('-')[:2]
        wheels[_normalize(name)] = (version, path)
    if not wheels:
        return [], 'wheels: none in .whl/ (bench/accelerator_wheels.sh downloads them)'
    found = _versions([site, *sys.path])
    missing = {name: v for name, v in wheels.items() if found.get(name) != v[0]}
    if missing:
        command = [sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps',
                   '--no-compile', '--no-cache-dir', '--upgrade', '--target', site,
                   *(path for _, path in missing.values())]
        log(' '.join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            tail = ' / '.join(done.stderr.strip().splitlines()[-3:])
            return [], f'wheels: pip install into {site} failed: {tail}'
    in_site = _versions([site]) if os.path.isdir(site) else {}
    used = [f'{name} {v[0]}' for name, v in wheels.items() if in_site.get(name) == v[0]]
    if not used:
        return [], f'wheels: the {len(wheels)} in .whl/ are installed here already'
    return [site], f'wheels from .whl/ in {site}: {", ".join(used)}'


def _tee(stream, lines: list[str], log: Log, prefix: str) -> None:
    for line in stream:
        line = line.rstrip('\n')
        lines.append(line)
        log(f'{prefix}{line}')


def run_process(argv: list[str], env: dict[str, str], seconds: float, log: Log, prefix: str
                ) -> tuple[str, list[str], list[str]]:
    """Runs `argv` from the repository root for at most `seconds`, its output teed to `log`;
    returns (status, stdout lines, stderr lines). On time out its whole process group goes."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = [], []
    readers = [threading.Thread(target=_tee, args=(stream, lines, log, prefix), daemon=True)
               for stream, lines in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    try:
        code = proc.wait(timeout=seconds)
        status = 'ok' if code == 0 else f'failed (exit status {code})'
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the part's workers and children too
        proc.wait()
        status = f'timed out after {seconds:.0f} s'
    for reader in readers:
        reader.join(timeout=10)   # a grandchild that left the group may hold a pipe open
    return status, out, err


def _pytest_lines(out: list[str]) -> list[str]:
    """pytest's failures (-rfE) and closing count; for a run cut short, the outcomes that -v
    had reported by then."""
    closing = [line.strip(' =') for line in out
               if re.search(r'\b\d+ (passed|failed|errors?)\b.* in [\d.]+s|no tests ran', line)]
    if closing:
        return [line[:300] for line in out if line.startswith(('FAILED ', 'ERROR '))
                ] + closing[-1:]
    outcomes = collections.Counter()
    failed = []
    for line in out:
        outcome = re.search(r'\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b', line)
        test = re.search(r'tests/\S+::\S+', line)
        if outcome and test:
            outcomes[outcome[1].lower()] += 1
            if outcome[1] in ('FAILED', 'ERROR'):
                failed.append(f'{outcome[1]} {test[0]}')
    so_far = ', '.join(f'{n} {outcome}' for outcome, n in outcomes.items()) or 'no test'
    return [*failed, f'{so_far} by then']


def _marked_lines(out: list[str]) -> list[str] | None:
    for line in reversed(out):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    return None


def parts(args, env: dict[str, str]) -> list[tuple[str, list[str], dict[str, str], str]]:
    """[(part, argv, env, kind)] in the order they run; kind is 'pytest' or 'lines'."""
    size = int(args.tiny)   # the index into PART_SECONDS' and BENCH_ARGS' pairs
    # -v: a run cut short still says which tests passed.
    pytest = [sys.executable, '-m', 'pytest', '-v', '-rfE', '-p', 'no:cacheprovider']
    gpu = 'cpu' if args.tiny else 'cuda'
    chosen = {
        'tests': ([*pytest, '-n', '0' if args.tiny else str(len(GPU_TESTS)), '--dist', 'loadfile',
                   '-m', 'not devices', *(TINY_TESTS if args.tiny else GPU_TESTS)],
                  {**env, 'JAX_PLATFORMS': gpu, 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'},
                  'pytest'),
    }
    for part, (module, flag_sets) in BENCH_ARGS.items():
        chosen[part] = ([sys.executable, '-m', 'bench.accelerator_check', _CHILD, module,
                         *flag_sets[size]], env, 'lines')
    return [(part, *chosen[part]) for part in PARTS if part not in args.skip]


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_bool('tiny', False, 'Every part at a tiny size on the CPU (a check of the code, '
                      'not a figure).', flag_values=flag_values)
    flags.DEFINE_list('skip', [], f'Parts left out, of {", ".join(PARTS)}.',
                      flag_values=flag_values)
    flags.DEFINE_integer('total_s', 450, 'Seconds for the whole check; a part that would run '
                         'past it gets what is left.', lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_string('site', '/tmp/site', "Where .whl/'s missing wheels are installed.",
                        flag_values=flag_values)
    flags.DEFINE_bool('append', False, 'Append the summary to bench/RESULTS.md.',
                      flag_values=flag_values)
    flags.register_validator('skip', lambda v: set(v) <= set(PARTS),
                             f'parts are {", ".join(PARTS)}', flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    run(flag_values)


def run(args) -> list[str]:
    """Installs what is missing, runs the parts; prints the summary, returns its lines, writes
    them under $OUT where it is set and (--append) to bench/RESULTS.md."""
    start = time.perf_counter()
    out_dir = os.environ.get('OUT')
    log = Log(os.path.join(out_dir, 'accelerator_check.log') if out_dir else None)
    log(f'{time.strftime("%Y-%m-%d %H:%M:%S")}: {results.command("accelerator_check", args)}')
    first, wheels_line = install_wheels(args.site, log)
    log(wheels_line)
    path = [*first, ROOT, *filter(None, os.environ.get('PYTHONPATH', '').split(os.pathsep))]
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(path), 'PYTHONUNBUFFERED': '1'}

    status, out, err = run_process([sys.executable, '-m', 'bench.accelerator_check', _CHILD,
                                    'header'], env, 120, log, '[header] ')
    lines = _marked_lines(out) or [f'header: {status}: {_tail(err)}']
    lines.append(wheels_line)
    for part, argv, part_env, kind in parts(args, env):
        left = args.total_s - (time.perf_counter() - start)
        seconds = min(PART_SECONDS[part][int(args.tiny)], left)
        if seconds < 5:
            lines.append(f'{part}: not run, {args.total_s} s (--total_s) spent')
            log(lines[-1])
            continue
        log(f'[{part}] {" ".join(argv)}   (at most {seconds:.0f} s)')
        part_start = time.perf_counter()
        status, out, err = run_process(argv, part_env, seconds, log, f'[{part}] ')
        figures = _pytest_lines(out) if kind == 'pytest' else _marked_lines(out)
        if figures is None:   # the part stopped early: the figures it printed until then
            figures = [line for line in out if line.strip()]
        lines.append(f'{part}: {status}, {time.perf_counter() - part_start:.0f} s')
        lines += [f'  {line}' for line in figures]
        if status != 'ok' and err:
            lines.append(f'  stderr: {_tail(err)}')
    lines.append(f'load average at end: {results.load_average()}; wall time '
                 f'{(time.perf_counter() - start) / 60:.1f} min')

    log('\nsummary:\n' + '\n'.join(lines))
    section = results.section('accelerator_check', lines, args)
    if out_dir:
        with open(os.path.join(out_dir, 'accelerator_check.md'), 'w') as f:
            f.write(section)
    if args.append:
        results.append('accelerator_check', lines, args)
    log.close()
    return lines


def _tail(err: list[str]) -> str:
    """The last lines of a stderr: a traceback's last frame and its exception."""
    return ' / '.join([line.strip() for line in err if line.strip()][-3:]) or '(nothing)'


def _child(what: str, *args: str) -> None:
    """A part's process: prints, after _MARK, bench.all's header (`what` = 'header') or the
    lines that benchmark module `what` returns, run on `args` as its own command runs."""
    if what == 'header':
        from bench import all as bench_all
        versions = ', '.join(f'{name} {results.version(name)}' for name in MORE_VERSIONS)
        print(_MARK + json.dumps([*bench_all.header(), f'more versions: {versions}; NVIDIA '
                                  f'driver {_nvidia_driver()}']), flush=True)
        return
    module = importlib.import_module(what)
    module.define_flags()

    def main(argv):
        print(_MARK + json.dumps(module.run(flags.FLAGS)), flush=True)
    app.run(main, argv=[what, *args], flags_parser=cli.parse_flags)   # grain reads absl flags


def _nvidia_driver() -> str:
    try:
        found = subprocess.run(['nvidia-smi', '--query-gpu=driver_version',
                                '--format=csv,noheader'], capture_output=True, text=True,
                               timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        found = ''
    return found.split('\n')[0] or 'none'


if __name__ == '__main__':
    if sys.argv[1:2] == [_CHILD]:
        _child(*sys.argv[2:])
    else:
        define_flags()
        app.run(main, flags_parser=cli.parse_flags)
