"""Importers and odd inputs: file names that are not UTF-8 (or hold a line break), dangling links,
empty class folders, EXIF orientation. One odd file never stops an import."""
import io
import os

import numpy as np
import pytest
from absl import flags
from PIL import Image, ImageOps

from sdtl_jax import cli
from sdtl_jax.data import layout, records, sources
from sdtl_jax.datasets import image_folder, imagenet100, images, pets, tfds
from sdtl_jax.errors import UserError

# grain reads absl flags; conftest.py does this too, but the module must also run on its own.
flags.FLAGS.mark_as_parsed()


def _jpeg(seed: int, size=(32, 24), orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    if orientation is None:
        image.save(buf, format='JPEG')
    else:
        exif = Image.Exif()
        exif[images.ORIENTATION_TAG] = orientation
        image.save(buf, format='JPEG', exif=exif.tobytes())
    return buf.getvalue()


def _write(path: str | bytes | os.PathLike, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def _read_all(dataset_dir, split: str) -> list[dict]:
    import grain
    source = grain.sources.ArrayRecordDataSource(sources.split_from_dir(dataset_dir, split).files)
    return [records.decode_record(source[i]) for i in range(len(source))]


def _unreadable_lines(dataset_dir, split: str) -> list[str]:
    """The lines of `<split>_unreadable.txt`, which must be UTF-8."""
    with open(os.path.join(dataset_dir, f'{split}_unreadable.txt'), 'rb') as f:
        return f.read().decode('utf-8').splitlines()


def _bad_name_folder(tmp_path) -> tuple[str, dict[str, bytes]]:
    """An image folder with a JPEG whose name is not UTF-8, a non-image of the same kind, a
    name with a line break and a dangling link; skips where the file system refuses such
    names (macOS)."""
    src = tmp_path / 'src'
    raw = os.fsencode(src)
    files = {b'a/good.jpg': _jpeg(0), b'a/bad\xff\xfe.jpg': _jpeg(1),
             b'b/ok.jpg': _jpeg(2), b'b/worse\xff.jpg': b'not an image',
             b'b/new\nline.jpg': b'not an image either'}
    try:
        for rel, data in files.items():
            _write(os.path.join(raw, rel), data)
    except OSError as e:
        pytest.skip(f'file system refuses names that are not UTF-8: {e}')
    os.symlink(os.path.join(raw, b'b', b'gone.jpg'), os.path.join(raw, b'b', b'link.jpg'))
    return str(src), files


def test_non_utf8_names_are_stored_or_listed(tmp_path, capsys):
    src, files = _bad_name_folder(tmp_path)
    out = tmp_path / 'out'
    args = [f'--src={src}', f'--out={out}', '--split=train', '--domain=real']
    assert cli.call(image_folder, args) == 0
    assert '3 unreadable' in capsys.readouterr().out
    meta = layout.read_meta(out)                 # written: the import completed
    assert meta['classes'] == ['a', 'b'] and meta['splits']['train']['class_counts'] == [2, 1]
    assert not (out / 'train.progress.json').exists()
    # The image with the bad name is stored; its id shows the bytes escaped, id_bytes has them.
    got = {r['id']: r for r in _read_all(out, 'train')}
    assert sorted(got) == ['a/bad\\xff\\xfe.jpg', 'a/good.jpg', 'b/ok.jpg']
    bad = got['a/bad\\xff\\xfe.jpg']
    assert bad['id_bytes'] == b'a/bad\xff\xfe.jpg' and bad['image'] == files[b'a/bad\xff\xfe.jpg']
    assert os.path.isfile(os.path.join(os.fsencode(src), bad['id_bytes']))
    assert os.path.isfile(os.path.join(src, os.fsdecode(bad['id_bytes'])))
    assert 'id_bytes' not in got['a/good.jpg']
    # The unreadable ones are listed one per line, in UTF-8, with the odd bytes escaped.
    lines = _unreadable_lines(out, 'train')
    listed = dict(line.split('\t', 1) for line in lines)
    assert sorted(listed) == sorted(os.path.join(src, 'b', n) for n in (
        'link.jpg', 'new\\nline.jpg', 'worse\\xff.jpg'))
    assert 'not an image' not in listed[os.path.join(src, 'b', 'worse\\xff.jpg')]
    assert 'FileNotFoundError' in listed[os.path.join(src, 'b', 'link.jpg')]
    for source in listed:     # back from the escaped text to the file
        assert os.path.lexists(records.name_bytes(source))
    # A re-run works and writes the same records.
    first = {r['id']: (r['image'], r.get('id_bytes')) for r in _read_all(out, 'train')}
    assert cli.call(image_folder, args) == 0
    assert {r['id']: (r['image'], r.get('id_bytes')) for r in _read_all(out, 'train')} == first
    assert [line.split('\t')[0] for line in _unreadable_lines(out, 'train')] == sorted(listed)


def test_non_utf8_name_in_imagenet_tree(tmp_path):
    wnid = sources.class_list('imagenet100')[0]
    raw = os.fsencode(tmp_path / 'imagenet' / 'train' / wnid)
    try:
        _write(os.path.join(raw, b'x\xff.JPEG'), _jpeg(3))
        _write(os.path.join(raw, b'y\xff.JPEG'), b'not a JPEG')
    except OSError as e:
        pytest.skip(f'file system refuses names that are not UTF-8: {e}')
    out = tmp_path / 'out'
    for _ in range(2):   # the second run re-writes the split
        [summary] = imagenet100.import_imagenet100(
            str(out), src=str(tmp_path / 'imagenet'), splits=['train'])
        assert summary['num_examples'] == 1 and len(summary['unreadable']) == 1
        [record] = _read_all(out, 'train')
        assert record['id'] == f'{wnid}/x\\xff.JPEG'
        assert record['id_bytes'] == f'{wnid}/x'.encode() + b'\xff.JPEG'
        assert _unreadable_lines(out, 'train')[0].startswith(
            os.path.join(str(tmp_path / 'imagenet' / 'train' / wnid), 'y\\xff.JPEG\t'))


def test_printable_and_record_id():
    name = os.fsdecode(b'bad\xff\xfe.jpg')
    assert records.printable(name) == 'bad\\xff\\xfe.jpg'
    assert records.printable('a\tb\nc.jpg') == 'a\\tb\\nc.jpg'
    assert records.printable('café.jpg') == 'café.jpg'
    assert records.record_id(name) == ('bad\\xff\\xfe.jpg', b'bad\xff\xfe.jpg')
    assert records.record_id('café.jpg') == ('café.jpg', None)
    record = records.decode_record(records.encode_record(b'x', 0, name))
    assert os.fsdecode(record['id_bytes']) == name
    for text in (name, 'a\tb\nc\r.jpg', 'café.jpg'):
        assert os.fsdecode(records.name_bytes(records.printable(text))) == text


# Empty class folders.

def _folder_with_empty_class(tmp_path):
    src = tmp_path / 'src'
    _write(src / 'a' / '0.jpg', _jpeg(0))
    _write(src / 'c' / '1.jpg', _jpeg(1))
    _write(src / 'b' / '.DS_Store', b'hidden files do not count')
    return src


def test_empty_class_folder_stops_the_import(tmp_path, capsys):
    src = _folder_with_empty_class(tmp_path)
    out = tmp_path / 'out'
    with pytest.raises(UserError, match='--allow_empty_classes') as e:
        image_folder.convert(str(src), str(out), split='train', domain='real')
    assert str(src / 'b') in str(e.value) and '\n' not in str(e.value)
    assert not (out / 'meta.json').exists()
    capsys.readouterr()
    args = [f'--src={src}', f'--out={out}', '--split=train', '--domain=real']
    assert cli.call(image_folder, args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and str(src / 'b') in err[0]


def test_allow_empty_classes(tmp_path, capsys):
    src = _folder_with_empty_class(tmp_path)
    out = tmp_path / 'out'
    assert cli.call(image_folder, [f'--src={src}', f'--out={out}', '--split=train',
                                        '--domain=real', '--allow_empty_classes']) == 0
    meta = layout.read_meta(out)
    assert meta['classes'] == ['a', 'b', 'c']
    assert meta['splits']['train']['class_counts'] == [1, 0, 1]
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith('warning:')]
    assert len(warnings) == 1 and str(src / 'b') in warnings[0]


def test_empty_class_folder_in_imagenet_tree(tmp_path):
    a, b = sources.class_list('imagenet100')[:2]
    root = tmp_path / 'imagenet'
    _write(root / 'train' / a / f'{a}_1.JPEG', _jpeg(0))
    os.makedirs(root / 'train' / b)
    with pytest.raises(UserError, match='--allow_empty_classes') as e:
        imagenet100.import_imagenet100(str(tmp_path / 'out'), src=str(root),
                                              splits=['train'])
    assert str(root / 'train' / b) in str(e.value)
    [summary] = imagenet100.import_imagenet100(
        str(tmp_path / 'out'), src=str(root), splits=['train'], allow_empty_classes=True)
    assert summary['num_examples'] == 1


# EXIF orientation.

def test_exif_transpose(tmp_path):
    src = tmp_path / 'src'
    rotated, upright = _jpeg(0, size=(40, 24), orientation=6), _jpeg(1, orientation=1)
    _write(src / 'a' / 'rotated.jpg', rotated)
    _write(src / 'a' / 'upright.jpg', upright)
    _write(src / 'a' / 'plain.jpg', _jpeg(2))
    as_is, turned = tmp_path / 'as_is', tmp_path / 'turned'
    base = [f'--src={src}', '--split=train', '--domain=real']
    assert cli.call(image_folder, [*base, f'--out={as_is}']) == 0
    assert cli.call(image_folder, [*base, f'--out={turned}', '--exif_transpose']) == 0
    stored = {r['id']: r['image'] for r in _read_all(as_is, 'train')}
    # Default: every image byte for byte, so it decodes as the file's pixels, 24 x 40.
    assert stored == {'a/rotated.jpg': rotated, 'a/upright.jpg': upright,
                      'a/plain.jpg': (src / 'a' / 'plain.jpg').read_bytes()}
    assert records.decode_image(stored['a/rotated.jpg']).shape == (24, 40, 3)
    # --exif_transpose: orientation 6 is stored turned upright (40 x 24), exactly as PIL's
    # exif_transpose shows it; upright images stay byte for byte.
    stored = {r['id']: r['image'] for r in _read_all(turned, 'train')}
    assert stored['a/upright.jpg'] == upright
    assert stored['a/plain.jpg'] == (src / 'a' / 'plain.jpg').read_bytes()
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(rotated))).convert('RGB'))
    got = records.decode_image(stored['a/rotated.jpg'])
    assert got.shape == (40, 24, 3)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.rot90(records.decode_image(rotated), k=-1))


@pytest.mark.parametrize('module, class_folders', [
    (image_folder, True), (imagenet100, True), (pets, False), (tfds, False)])
def test_importer_flags(module, class_folders):
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    assert flag_values['exif_transpose'].default is False
    assert 'EXIF' in flag_values['exif_transpose'].help
    assert ('allow_empty_classes' in flag_values) == class_folders
