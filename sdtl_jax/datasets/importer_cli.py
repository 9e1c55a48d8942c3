"""What the importers' command lines share: the writer flags and the exit status.

An importer defines its own flags, then `define_writer_flags` and
`flags.adopt_module_key_flags(importer_cli)`, so that its --help shows these too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app, flags

from sdtl_jax.data import layout, records
from sdtl_jax.errors import UserError


def define_writer_flags(flag_values: flags.FlagValues, *, class_folders: bool = False) -> None:
    """The flags every importer shares: --records_per_shard, --num_threads, --exif_transpose,
    and --allow_empty_classes for the importers that read class folders."""
    flags.DEFINE_integer('records_per_shard', layout.DEFAULT_RECORDS_PER_SHARD,
                         'Input images per shard (the default is ~225 MB of ImageNet JPEGs).',
                         lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer('num_threads', 8, 'Threads that read and check images.', lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_boolean('exif_transpose', False,
                         'Store images whose EXIF Orientation is not 1 turned upright '
                         '(PIL.ImageOps.exif_transpose), re-encoded as lossless PNG. Default: '
                         'off, pixels stored as in the file, EXIF orientation ignored, as '
                         "torchvision's and timm's ImageFolder (PIL) and training's decoder do.",
                         flag_values=flag_values)
    if class_folders:
        _define_allow_empty_classes(flag_values)


def run_command(argv: Sequence[str], write: Callable[[], Sequence[Mapping[str, Any]]]) -> int:
    """Runs an importer for its command line (`argv`: absl's, no positional arguments): exit 0
    when some records were written, 1 when none were or on an `errors.UserError` (e.g. an empty
    class folder; one `error:` line), 2 (with an `error:` line) on missing or bad input."""
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    try:
        summaries = write()
    except UserError as e:
        print(f'error: {records.printable(str(e))}', file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0 if any(s['num_examples'] for s in summaries) else 1


def _define_allow_empty_classes(flag_values: flags.FlagValues) -> None:
    """--allow_empty_classes, for the importers that read class folders."""
    flags.DEFINE_boolean('allow_empty_classes', False,
                         'Keep a class whose folder holds no files, with 0 examples (a warning '
                         'line names it). Default: an empty class folder stops the import.',
                         flag_values=flag_values)
