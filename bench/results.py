"""Appends a benchmark's printed lines to bench/RESULTS.md, with the date and the command."""

import datetime
import os
import sys

RESULTS = os.path.join(os.path.dirname(__file__), 'RESULTS.md')


def append(name: str, lines: list[str], argv: list[str] | None = None) -> None:
    """Adds a `### <name>, <date>` entry: the command (without --append) and `lines`."""
    shown = ' '.join(a for a in (sys.argv[1:] if argv is None else argv) if a != '--append')
    with open(RESULTS, 'a') as f:
        f.write(f'\n### {name}, {datetime.date.today()}\n\n'
                f'`python -m bench.{name} {shown}`\n\n```\n' + '\n'.join(lines) + '\n```\n')
