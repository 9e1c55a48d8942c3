"""Local writes: the one atomic-write helper and the one JSON writer every module uses."""
import json
import os

import pytest

from sdtl_jax import fileio


def test_atomic_path_replaces_the_file_only_when_the_block_ends(tmp_path):
    path = tmp_path / 'state.json'
    path.write_text('old')
    with fileio.atomic_path(path) as tmp:
        with open(tmp, 'w') as f:
            f.write('new')
        assert path.read_text() == 'old'        # a reader meanwhile sees the old file
        assert tmp == f'{path}.tmp.{os.getpid()}'
    assert path.read_text() == 'new'
    assert sorted(os.listdir(tmp_path)) == ['state.json']


@pytest.mark.parametrize('error', [ValueError, KeyboardInterrupt])
def test_atomic_path_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, error):
    path = tmp_path / 'state.json'
    path.write_text('old')
    with pytest.raises(error):
        with fileio.atomic_path(path) as tmp:
            with open(tmp, 'w') as f:
                f.write('half')
            raise error()
    assert path.read_text() == 'old'
    assert sorted(os.listdir(tmp_path)) == ['state.json']


def test_atomic_path_with_a_named_temporary_file(tmp_path):
    """Writers that find their killed runs' leftovers by name choose the temporary name."""
    final, tmp = tmp_path / 'train-00000-of-00001.array_record', str(tmp_path / '.tmp-train-0')
    with fileio.atomic_path(final, tmp) as path:
        assert path == tmp
        with open(path, 'wb') as f:
            f.write(b'records')
    assert final.read_bytes() == b'records' and not os.path.exists(tmp)
    with pytest.raises(RuntimeError), fileio.atomic_path(final, tmp) as path:   # nothing written
        raise RuntimeError()
    assert final.read_bytes() == b'records'


def test_write_json_is_sorted_indented_or_compact_and_ends_with_a_newline(tmp_path):
    path = tmp_path / 'sub' / 'results.json'     # folders are made
    fileio.write_json(path, {'b': [1, 2], 'a': {'y': 1.5, 'x': None}})
    assert path.read_text() == ('{\n  "a": {\n    "x": null,\n    "y": 1.5\n  },\n'
                                '  "b": [\n    1,\n    2\n  ]\n}\n')
    assert json.loads(path.read_text()) == {'b': [1, 2], 'a': {'y': 1.5, 'x': None}}
    fileio.write_json(path, {'b': [1, 2], 'a': 'x'}, compact=True)
    assert path.read_text() == '{"a":"x","b":[1,2]}\n'
