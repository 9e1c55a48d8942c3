"""Appends a benchmark's printed lines to bench/RESULTS.md, with the date and the command;
the provenance figures every entry states (load average, library versions)."""

import datetime
import os
from importlib import metadata

from absl import flags

from sdtl_jax import cli

RESULTS = os.path.join(os.path.dirname(__file__), 'RESULTS.md')


def load_average() -> str:
    return '{:.2f}, {:.2f}, {:.2f} (1, 5, 15 min)'.format(*os.getloadavg())


def version(name: str) -> str:
    """The installed version of distribution `name`, or 'missing'."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return 'missing'


def command(name: str, flag_values: flags.FlagValues) -> str:
    """`python -m bench.<name>` and the flags it was given (in the order they are defined),
    without --append."""
    return ' '.join([f'python -m bench.{name}', *cli.given(flag_values, leave_out=('append',))])


def section(name: str, lines: list[str], flag_values: flags.FlagValues) -> str:
    """A `### <name>, <date>` entry: the command (without --append) and `lines`."""
    return (f'\n### {name}, {datetime.date.today()}\n\n'
            f'`{command(name, flag_values)}`\n\n```\n' + '\n'.join(lines) + '\n```\n')


def append(name: str, lines: list[str], flag_values: flags.FlagValues) -> None:
    """Adds `section(name, lines, flag_values)` to RESULTS."""
    with open(RESULTS, 'a') as f:
        f.write(section(name, lines, flag_values))
