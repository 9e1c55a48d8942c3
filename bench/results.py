"""Appends a benchmark's printed lines to bench/RESULTS.md, with the date and the command."""

import datetime
import os
import sys

RESULTS = os.path.join(os.path.dirname(__file__), 'RESULTS.md')


def command(name: str, argv: list[str] | None = None) -> str:
    """`python -m bench.<name>` and its arguments (by default this process's), without --append."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != '--append']
    return ' '.join([f'python -m bench.{name}', *args])


def append(name: str, lines: list[str], argv: list[str] | None = None) -> None:
    """Adds a `### <name>, <date>` entry: the command (without --append) and `lines`."""
    with open(RESULTS, 'a') as f:
        f.write(f'\n### {name}, {datetime.date.today()}\n\n'
                f'`{command(name, argv)}`\n\n```\n' + '\n'.join(lines) + '\n```\n')
