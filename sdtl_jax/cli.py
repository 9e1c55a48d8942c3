"""The command-line convention of every command, and the list `python -m sdtl_jax` prints.

Every command is an absl app, as in big_vision and the Flax examples: `--name=value` flags (a
boolean is `--name` / `--noname`), and a module docstring whose first lines are its usage,
`python -m sdtl_jax.X --flag=...`, which `--help` prints with the command's flags. `--help`
exits 0 (absl's own exits 1); a bad command line (a flag unknown, missing or of a bad value, an
argument that is not a flag) exits 1 with absl's message. A command module defines its flags in
a function, called only where it runs as a program:

    def define_flags(flag_values=flags.FLAGS): flags.DEFINE_string(..., flag_values=flag_values)

    def main(argv, flag_values=flags.FLAGS): ...      # reads its flags from flag_values

    if __name__ == '__main__':
        define_flags()
        app.run(main, flags_parser=cli.parse_flags)

Importing it therefore defines no flag: two modules that both define `--out` can be imported
by one test, and a library module that a command also is (convert, the importers) adds no flags
to the programs that import it. Tests, and commands that run another (bench.all), run a
command in their own process on flags of its own: `cli.call(module, ['--out=DIR', ...])`.
(main.py and datasets/generate/__main__.py, programs that nothing imports but a test of their own,
define their flags at import; report.py and analyze.py under `if __name__ == '__main__'`.)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from absl import app, flags

# absl's help flags (`-?` is --help's short name); each makes absl print the usage and exit 1.
HELP_FLAGS = ('help', 'helpshort', 'helpfull', 'helpxml', '?')

# What `python -m sdtl_jax` lists: (heading, [(command, what it does)]).
COMMANDS = (
    ('Training and analysis', (
        ('python -m sdtl_jax.main', 'experiment or study: --config=X.py --workdir=DIR'),
        ('python -m sdtl_jax.report', "a study's report.md and figures: --workdir=DIR"),
        ('python -m sdtl_jax.analyze', "two runs' features, layer by layer (CKA, probes)"),
        ('python -m sdtl_jax.models', "a model's 18 layers and their parameter counts"),
        ('python -m sdtl_jax.convert', 'PyTorch weights -> Orbax, for transfer.init_from'),
    )),
    ('Data', (
        ('python -m sdtl_jax.datasets.generate', 'a synthetic dataset from Stable Diffusion'),
        ('python -m sdtl_jax.datasets.generate.tiny',
         'a tiny random Stable Diffusion pipeline (CPU)'),
        ('python -m sdtl_jax.datasets.generate.random_sd', "SD 1.4's architecture, random weights"),
        ('python -m sdtl_jax.datasets.imagenet100', 'ImageNet-100 from ImageNet-1k'),
        ('python -m sdtl_jax.datasets.pets', 'Oxford-IIIT Pets from its archives'),
        ('python -m sdtl_jax.datasets.tfds', 'a TFDS dataset prepared as array_record'),
        ('python -m sdtl_jax.datasets.image_folder', 'an image folder, a sub-folder per class'),
        ('python -m sdtl_jax.datasets.digits', "the digits demo's data and its linear-probe gap"),
    )),
    ('Benchmarks (from the repository root)', (
        ('python -m bench.all', 'the suite: train step, loader, generator'),
        ('python -m bench.train_step_speed', 'our train step against the PyTorch reference'),
        ('python -m bench.freeze_speed', 'the step with a frozen prefix against N = 0'),
        ('python -m bench.profile_step', "where the step's time goes, ours and PyTorch's"),
        ('python -m bench.loader_speed', 'decode + multi-crop samples/s per CPU core'),
        ('python -m bench.generator_speed', "the generator's images/s against diffusers'"),
        ('python -m bench.accelerator_check', 'GPU tests and benchmarks in one timed call'),
        ('python -m bench.rehearsal', 'paper-sized data and models end to end'),
    )),
    ('Launchers (from the repository root; --gpus=N always means N GPUs per host)', (
        ('launch/train_multi_gpu.sh', "an experiment or study on this host's GPUs"),
        ('launch/train_slurm.sh', 'an experiment or study on a SLURM cluster'),
        ('launch/generate_multi_gpu.sh', "a synthetic dataset, a worker per GPU of this host"),
        ('launch/generate_slurm.sh', 'a synthetic dataset on a SLURM cluster'),
        ('launch/tpu_pod.sh', 'an experiment on a Cloud TPU VM or pod slice'),
        ('python launch/study_slurm.py', 'a study on a SLURM cluster: a job array per stage'),
        ('python launch/sweep.py', "a study's runs over machines without a scheduler"),
    )),
)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing for `app.run(main, flags_parser=...)`, but `--help` exits 0."""
    try:
        return app.parse_flags_with_usage(list(argv))
    except SystemExit as e:
        if e.code == 1 and asks_for_help(argv):
            raise SystemExit(0) from None
        raise


def asks_for_help(argv: Sequence[str]) -> bool:
    """Whether the command line `argv` (program first) holds one of absl's help flags."""
    for arg in argv[1:]:
        if arg == '--':
            break
        if arg.startswith('-') and arg.lstrip('-').split('=', 1)[0] in HELP_FLAGS:
            return True
    return False


def parse(module: ModuleType, args: Sequence[str]) -> flags.FlagValues:
    """`module`'s flags (its `define_flags`), parsed from `args` into a FlagValues of their
    own, not absl's global FLAGS. Raises flags.Error for bad flags (a missing required one, an
    unknown one), app.UsageError for arguments that are not flags."""
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    rest = flag_values([module.__name__, *args])
    if len(rest) > 1:
        raise app.UsageError(f'Unexpected arguments: {rest[1:]}')
    return flag_values


def call(module: ModuleType, args: Sequence[str]) -> Any:
    """Runs `module`'s command in this process, as `python -m <module> args` would; returns
    what its `main` returns (the exit status)."""
    return module.main([module.__name__], parse(module, args))


def given(flag_values: flags.FlagValues, leave_out: Sequence[str] = ()) -> list[str]:
    """The flags set on the command line, as `--name=value` in the order they are defined."""
    return [flag_values[name].serialize() for name in flag_values
            if flag_values[name].present and name == flag_values[name].name
            and name not in leave_out]


def list_commands() -> str:
    """The text `python -m sdtl_jax` prints: every command, one line each."""
    width = max(len(command) for _, commands in COMMANDS for command, _ in commands)
    lines = ['sdtl_jax: synthetic-to-real transfer learning in JAX/Flax. Commands (each takes '
             '--help):']
    for heading, commands in COMMANDS:
        lines += ['', f'{heading}:']
        lines += [f'  {command:<{width}}  {what}' for command, what in commands]
    return '\n'.join(lines)


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1 and not asks_for_help(argv):
        print(f'python -m sdtl_jax takes no arguments, got {list(argv[1:])}; it lists the '
              'commands:\n', file=sys.stderr)
        print(list_commands(), file=sys.stderr)
        return 2
    print(list_commands())
    return 0
