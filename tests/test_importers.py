"""Tests of the importers (ImageNet-100, Pets, image folder, TFDS) on tiny trees and tars in the
published layouts: counts, labels, identical output across layouts, resume, bad inputs."""
import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
import scipy.io
from absl import flags
from PIL import Image

from sdtl_jax import cli
from sdtl_jax.data import input_pipeline, layout, records, sources
from sdtl_jax.datasets import image_folder, imagenet100, shards
from sdtl_jax.datasets import pets as pets_importer

# grain reads absl flags; conftest.py does this too, but the module must also run on its own.
flags.FLAGS.mark_as_parsed()

WNIDS = sources.class_list('imagenet100')
A, B, C = WNIDS[0], WNIDS[1], WNIDS[50]
OTHER = 'n01440764'       # an ImageNet-1k class outside ImageNet-100: always left out
TRAIN = {A: 3, B: 2, OTHER: 2}
VAL = [B, A, OTHER, A, C, B]                     # wnid of ILSVRC2012_val_00000001.JPEG, ...
ILSVRC_ID = {OTHER: 1, C: 2, B: 3, A: 4}         # ILSVRC2012_IDs are not in sorted wnid order


def _jpeg(seed: int, mode: str = 'RGB', size=(32, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.convert(mode).save(buf, format='JPEG')
    return buf.getvalue()


def _png(image: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format='PNG')
    return buf.getvalue()


def _write(path, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb' if isinstance(data, bytes) else 'w') as f:
        f.write(data)


def _tar(path, files: dict[str, bytes], mode: str = 'w') -> None:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _read_all(dataset_dir, split: str) -> list[dict]:
    """Every record of a split, in shard order."""
    import grain
    source = grain.sources.ArrayRecordDataSource(sources.split_from_dir(dataset_dir, split).files)
    return [records.decode_record(source[i]) for i in range(len(source))]


def _unreadable(dataset_dir, split: str) -> dict[str, str]:
    path = os.path.join(dataset_dir, f'{split}_unreadable.txt')
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return dict(line.rstrip('\n').split('\t', 1) for line in f)


def _meta_mat() -> bytes:
    synsets = np.zeros((len(ILSVRC_ID) + 1, 1),
                       dtype=[('ILSVRC2012_ID', 'O'), ('WNID', 'O'), ('words', 'O')])
    for row, (wnid, i) in enumerate([*ILSVRC_ID.items(), ('n00001740', 1001)]):
        synsets[row, 0] = (np.array([[i]], np.uint16), np.array([wnid]), np.array(['w']))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {'synsets': synsets})
    return buf.getvalue()


# ImageNet-100.

@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
    """The same images in four published layouts."""
    root = tmp_path_factory.mktemp('imagenet')
    train = {f'{w}/{w}_{k}.JPEG': _jpeg(hash((w, k)) % 1000) for w, n in TRAIN.items()
             for k in range(n)}
    val = {f'ILSVRC2012_val_{i:08d}.JPEG': _jpeg(500 + i) for i in range(1, len(VAL) + 1)}
    gt_text = ''.join(f'{ILSVRC_ID[w]}\n' for w in VAL)
    layouts = {name: root / name for name in ('folders', 'devkit', 'kaggle', 'tars')}
    for rel, data in train.items():
        for name in ('folders', 'devkit'):
            _write(layouts[name] / 'train' / rel, data)
        _write(layouts['kaggle'] / 'ILSVRC/Data/CLS-LOC/train' / rel, data)
    for (fname, data), wnid in zip(val.items(), VAL):
        _write(layouts['folders'] / 'val' / wnid / fname, data)
        _write(layouts['devkit'] / 'val' / fname, data)
        _write(layouts['kaggle'] / 'ILSVRC/Data/CLS-LOC/val' / fname, data)
    # Extracted devkit next to the tree; Kaggle's csv three levels above CLS-LOC.
    _write(layouts['devkit'] / 'ILSVRC2012_devkit_t12/data/meta.mat', _meta_mat())
    _write(layouts['devkit'] / 'ILSVRC2012_devkit_t12/data/'
           'ILSVRC2012_validation_ground_truth.txt', gt_text)
    with open(layouts['kaggle'] / 'LOC_val_solution.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['ImageId', 'PredictionString'])
        for fname, wnid in reversed(list(zip(val, VAL))):
            writer.writerow([fname[:-len('.JPEG')], f'{wnid} 1 2 30 20 {wnid} 3 4 10 10'])
    tars = layouts['tars']
    tars.mkdir()
    inner = {}
    for wnid in TRAIN:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode='w') as t:
            for rel, data in train.items():
                if rel.startswith(wnid):
                    info = tarfile.TarInfo(os.path.basename(rel))
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
        inner[f'{wnid}.tar'] = buf.getvalue()
    _tar(tars / 'ILSVRC2012_img_train.tar', inner)
    _tar(tars / 'ILSVRC2012_img_val.tar', val)
    _tar(tars / 'ILSVRC2012_devkit_t12.tar.gz',
         {'ILSVRC2012_devkit_t12/data/meta.mat': _meta_mat(),
          'ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt':
              gt_text.encode()}, 'w:gz')
    return layouts


def _expected_imagenet():
    train = sorted((f'{w}/{w}_{k}.JPEG', WNIDS.index(w)) for w, n in TRAIN.items()
                   for k in range(n) if w != OTHER)
    val = sorted((f'{w}/ILSVRC2012_val_{i:08d}.JPEG', WNIDS.index(w))
                 for i, w in enumerate(VAL, 1) if w != OTHER)
    return {'train': train, 'val': val}


def test_imagenet_layouts_agree(imagenet, tmp_path, capsys):
    outs = {name: tmp_path / name for name in imagenet}
    assert cli.call(imagenet100, [f'--src={imagenet["folders"]}',
                                         f'--out={outs["folders"]}']) == 0
    assert cli.call(imagenet100, [f'--src={imagenet["devkit"]}',
                                         f'--out={outs["devkit"]}']) == 0
    assert cli.call(imagenet100, [f'--src={imagenet["kaggle"]}',
                                         f'--out={outs["kaggle"]}']) == 0
    tars = imagenet['tars']
    assert cli.call(imagenet100, [f'--train_tar={tars}/ILSVRC2012_img_train.tar',
                                         f'--val_tar={tars}/ILSVRC2012_img_val.tar',
                                         f'--devkit={tars}/ILSVRC2012_devkit_t12.tar.gz',
                                         f'--out={outs["tars"]}', '--records_per_shard=2']) == 0
    assert 'warning: [imagenet100_real/train] 5 records, the full dataset has 126,689' in (
        capsys.readouterr().err)
    expected = _expected_imagenet()
    reference = {split: _read_all(outs['folders'], split) for split in ('train', 'val')}
    for split, want in expected.items():
        assert [(r['id'], r['label']) for r in reference[split]] == want
        np.testing.assert_array_equal(layout.read_labels(outs['folders'], split),
                                      [label for _, label in want])
        for name in ('devkit', 'kaggle', 'tars'):
            assert _read_all(outs[name], split) == reference[split], (name, split)
            np.testing.assert_array_equal(layout.read_labels(outs[name], split),
                                          [label for _, label in want])
    meta = layout.read_meta(outs['tars'])
    assert meta['classes'] == WNIDS and meta['domain'] == 'real'
    assert meta['splits']['train']['num_examples'] == 5
    assert len(meta['splits']['train']['files']) == 3          # 5 images, 2 per shard
    assert meta['splits']['val']['class_counts'][WNIDS.index(B)] == 2
    for out in outs.values():
        assert not _unreadable(out, 'train') and not _unreadable(out, 'val')
        assert not [f for f in os.listdir(out) if 'progress' in f or f.startswith('.')]


def test_imagenet_flat_val_needs_ground_truth(imagenet, tmp_path, capsys):
    src = tmp_path / 'flat'
    for fname in os.listdir(imagenet['devkit'] / 'val'):
        _write(src / 'val' / fname, (imagenet['devkit'] / 'val' / fname).read_bytes())
    assert cli.call(imagenet100, [f'--src={src}', f'--out={tmp_path}/out',
                                         '--splits=val']) == 2
    err = capsys.readouterr().err
    assert '--devkit=ILSVRC2012_devkit_t12.tar.gz' in err and 'LOC_val_solution.csv' in err
    # The devkit's ground truth without meta.mat: the error names the missing file.
    gt = tmp_path / 'gt' / 'ILSVRC2012_validation_ground_truth.txt'
    _write(gt, '1\n')
    assert cli.call(imagenet100, [f'--src={src}', f'--val_labels={gt}',
                                         f'--out={tmp_path}/out', '--splits=val']) == 2
    assert str(tmp_path / 'gt' / 'meta.mat') in capsys.readouterr().err
    # A val file the ground truth does not cover is reported by path.
    _write(src / 'val' / 'ILSVRC2012_val_00000099.JPEG', _jpeg(1))
    assert cli.call(imagenet100, [
        f'--src={src}', f'--out={tmp_path}/out', '--splits=val',
        f'--devkit={imagenet["devkit"]}/ILSVRC2012_devkit_t12']) == 0
    assert _unreadable(tmp_path / 'out', 'val') == {
        str(src / 'val' / 'ILSVRC2012_val_00000099.JPEG'):
            'no ground-truth label for this file name'}


# Oxford-IIIT Pet.

PETS = {  # image -> (class id, species): trainval / test
    'trainval': [('Abyssinian_1', 1, 1), ('american_bulldog_10', 2, 2), ('Bengal_3', 6, 1),
                 ('yorkshire_terrier_7', 37, 2), ('Abyssinian_2', 1, 1)],
    'test': [('american_bulldog_11', 2, 2), ('Bengal_4', 6, 1), ('Abyssinian_5', 1, 1)],
}
HEADER = '#Image CLASS-ID SPECIES BREED-ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n'


def _pets_list(entries) -> str:
    return HEADER + ''.join(f'{name} {cid} {sp} 1\n' for name, cid, sp in entries)


@pytest.fixture(scope='module')
def pets(tmp_path_factory):
    """images/ + annotations/ folders, and the official .tar.gz archives of the same files."""
    root = tmp_path_factory.mktemp('pets')
    images = {f'images/{name}.jpg': _jpeg(i) for i, (name, _, _) in
              enumerate(PETS['trainval'] + PETS['test'])}
    images['images/Abyssinian_100.mat'] = b'MATLAB 5.0 MAT-file'   # the real folder has a few
    annotations = {'annotations/trainval.txt': _pets_list(PETS['trainval']).encode(),
                   'annotations/test.txt': _pets_list(PETS['test']).encode(),
                   'annotations/list.txt': b'# not read\n'}
    for rel, data in {**images, **annotations}.items():
        _write(root / 'folders' / rel, data)
    (root / 'tars').mkdir()
    _tar(root / 'tars' / 'images.tar.gz', images, 'w:gz')
    _tar(root / 'tars' / 'annotations.tar.gz', annotations, 'w:gz')
    # TFDS notes that the published images.tar.gz may be a plain tar despite its name.
    (root / 'plain').mkdir()
    _tar(root / 'plain' / 'images.tar.gz', images)
    return root


def test_pets_archives_and_folders(pets, tmp_path):
    from_tars, from_folders = tmp_path / 'tars', tmp_path / 'pets_real'
    assert cli.call(pets_importer, [f'--src={pets}/tars', f'--out={from_tars}']) == 0
    assert cli.call(pets_importer, [f'--src={pets}/folders', f'--out={from_folders}']) == 0
    plain = tmp_path / 'plain'
    assert cli.call(pets_importer, [f'--images={pets}/plain/images.tar.gz', f'--out={plain}',
                                  f'--annotations={pets}/tars/annotations.tar.gz']) == 0
    assert not os.path.exists(from_tars / pets_importer.CACHE_DIR)   # decompressed copy removed
    classes = sources.class_list('pets')
    for split, listed in (('train', PETS['trainval']), ('test', PETS['test'])):
        got = _read_all(from_folders, split)
        assert _read_all(from_tars, split) == got and _read_all(plain, split) == got
        want = sorted((cid - 1, f'{name}.jpg') for name, cid, _ in listed)
        assert [(r['label'], r['id']) for r in got] == want
        assert all(classes[r['label']] == r['id'].rsplit('_', 1)[0] for r in got)
        assert got[0]['image'] == (pets / 'folders' / 'images' / got[0]['id']).read_bytes()
        assert not _unreadable(from_folders, split)
    meta = layout.read_meta(from_folders)
    assert meta['splits']['train']['num_examples'] == 5 and meta['classes'] == classes
    assert meta['splits']['train']['class_counts'][:6] == [2, 1, 0, 0, 0, 1]
    # The registry finds it, and a training input pipeline reads the right labels.
    split = sources.resolve('pets_real', tmp_path, 'train')
    labels = layout.read_labels(tmp_path / 'pets_real', 'train')
    batches = list(input_pipeline.eval_batches(split, global_batch=4, resize=16, crop=16,
                                               num_threads=2))
    seen = np.concatenate([b['label'][b['mask']] for b in batches])
    np.testing.assert_array_equal(seen, labels)
    assert batches[0]['image'].shape == (4, 16, 16, 3)
    train = iter(input_pipeline.train_dataset(split, global_batch=4, seed=0,
                                              aug={'name': 'pytorch', 'global_size': 16}))
    batch = next(train)
    assert batch['global'].shape == (4, 1, 16, 16, 3) and set(batch['label']) <= set(labels)


def test_pets_bad_annotations(pets, tmp_path):
    annotations = tmp_path / 'annotations'
    lines = [('Abyssinian_1', 1, 1), ('Bengal_3', 0, 1), ('Bengal_3', 38, 1),
             ('Bengal_3', 2, 1), ('Bengal_9', 6, 1)]
    _write(annotations / 'trainval.txt', _pets_list(lines) + 'Bengal_3 six 1 1\n')
    _write(annotations / 'test.txt', HEADER)
    out = tmp_path / 'out'
    assert cli.call(pets_importer, [f'--images={pets}/folders/images',
                                    f'--annotations={annotations}', f'--out={out}']) == 0
    trainval = str(annotations / 'trainval.txt')
    assert _unreadable(out, 'train') == {
        f'{trainval}:5': 'class id 0 of Bengal_3 outside 1..37',
        f'{trainval}:6': 'class id 38 of Bengal_3 outside 1..37',
        f'{trainval}:7': "Bengal_3 has class id 2, which is 'american_bulldog' in the official "
                         "order",
        f'{trainval}:9': 'expected "Image CLASS-ID SPECIES BREED-ID", got \'Bengal_3 six 1 1\'',
        f'{pets}/folders/images/Bengal_9.jpg': f'listed in {trainval} but missing'}
    assert [r['id'] for r in _read_all(out, 'train')] == ['Abyssinian_1.jpg']
    assert layout.read_meta(out)['splits']['test']['num_examples'] == 0


# Image folder (users' own data, generated images).

def test_write_arrayrecord(tmp_path):
    src = tmp_path / 'src'
    for cls in ('cat', 'dog'):
        for i in range(2):
            _write(src / cls / f'{i}.jpg', _jpeg(i))
        buf = io.BytesIO()
        Image.fromarray(np.full((6, 5, 3), 9, np.uint8)).save(buf, format='BMP')
        _write(src / cls / 'x.bmp', buf.getvalue())
    _write(src / 'dog' / 'broken.jpg', b'\xff\xd8 not really a jpeg')
    _write(src / 'dog' / '0.json', '{"seed": 5}')
    out = tmp_path / 'out'
    assert cli.call(image_folder, [f'--src={src}', f'--out={out}', '--split=train',
                                        '--domain=real']) == 0
    assert str(src / 'dog' / 'broken.jpg') in _unreadable(out, 'train')
    meta = layout.read_meta(out)
    assert meta['name'] == 'out' and meta['classes'] == ['cat', 'dog']
    assert meta['splits']['train']['class_counts'] == [3, 3]
    by_id = {r['id']: r for r in _read_all(out, 'train')}
    assert by_id[os.path.join('cat', '0.jpg')]['image'] == (src / 'cat' / '0.jpg').read_bytes()
    assert by_id[os.path.join('dog', '0.jpg')]['meta'] == {'seed': 5}
    assert Image.open(io.BytesIO(by_id[os.path.join('cat', 'x.bmp')]['image'])).format == 'PNG'
    np.testing.assert_array_equal(layout.read_labels(out, 'train'), [0, 0, 0, 1, 1, 1])
    # A second split is merged into meta.json; a registered name uses the registry's order.
    image_folder.convert(str(src), str(out), split='val', domain='real')
    assert set(layout.read_meta(out)['splits']) == {'train', 'val'}
    pets_src = tmp_path / 'pets'
    for cls in ('yorkshire_terrier', 'Abyssinian'):
        _write(pets_src / cls / 'a.jpg', _jpeg(3))
    image_folder.convert(str(pets_src), str(tmp_path / 'pets_synth'), split='train',
                              domain='synth')
    np.testing.assert_array_equal(layout.read_labels(tmp_path / 'pets_synth', 'train'), [0, 36])


def _rgb16() -> bytes:
    return _png((np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16))


def test_bad_inputs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    good = _jpeg(0)
    convertible = {
        'gray.jpg': _jpeg(1, 'L'), 'cmyk.jpg': _jpeg(2, 'CMYK'), 'rgba.png': _png(rgba),
        'sixteen.png': _rgb16(), 'palette.png': _png(Image.fromarray(rgba[..., :3]).quantize(8)),
        'png_named.jpg': _png(rgba[..., :3]),
    }
    buf = io.BytesIO()
    Image.fromarray(rgba[..., :3]).save(buf, format='WEBP', lossless=True)
    convertible['image.webp'] = buf.getvalue()
    unreadable = {'truncated.jpg': good[:len(good) // 2], 'empty.jpg': b'',
                  'corrupt.jpg': b'\xff\xd8\xff\xe0' + bytes(range(256)) * 4,
                  'notes.txt': b'not an image'}
    src = tmp_path / 'src'
    _write(src / 'a' / 'good.jpg', good)
    for name, data in {**convertible, **unreadable}.items():
        _write(src / 'b' / name, data)
    out = tmp_path / 'out'
    assert cli.call(image_folder, [f'--src={src}', f'--out={out}', '--split=train',
                                        '--domain=real']) == 0
    assert f'{len(unreadable)} unreadable' in capsys.readouterr().out
    listed = _unreadable(out, 'train')
    assert sorted(listed) == sorted(str(src / 'b' / n) for n in unreadable)
    assert 'empty file' in listed[str(src / 'b' / 'empty.jpg')]
    assert 'truncated' in listed[str(src / 'b' / 'truncated.jpg')]
    by_id = {os.path.basename(r['id']): r for r in _read_all(out, 'train')}
    assert sorted(by_id) == sorted(['good.jpg', *convertible])
    assert by_id['good.jpg']['image'] == good                     # RGB JPEG: byte for byte
    assert by_id['png_named.jpg']['image'] == convertible['png_named.jpg']  # 8-bit RGB PNG
    for name in convertible:
        image = records.decode_image(by_id[name]['image'])
        assert image.dtype == np.uint8 and image.shape == (24, 32, 3), name
        if name != 'png_named.jpg':
            assert Image.open(io.BytesIO(by_id[name]['image'])).mode == 'RGB', name
    sixteen = records.decode_image(by_id['sixteen.png']['image'])
    assert sixteen[-1, -1, 0] == round((24 * 32 - 1) * 80 * 255 / 65535)
    # Nothing readable: nothing written, and the command fails.
    only_bad = tmp_path / 'bad'
    _write(only_bad / 'x' / 'empty.jpg', b'')
    assert cli.call(image_folder, [f'--src={only_bad}', f'--out={tmp_path}/o', '--split=train',
                                        '--domain=real']) == 1


# Resume and re-run.

def _folder(tmp_path, n: int = 6):
    src = tmp_path / 'src'
    for i in range(n):
        _write(src / ('a' if i % 2 else 'b') / f'{i}.jpg', _jpeg(i))
    return src


def _shards(out) -> dict[str, bytes]:
    return {f: (out / f).read_bytes() for f in sorted(os.listdir(out))
            if f.endswith('.array_record')}


class _Killed(BaseException):
    """Stands for the process being killed: not an Exception, so no handler catches it."""


def test_resume_after_kill(tmp_path, monkeypatch):
    src = _folder(tmp_path)
    reference = tmp_path / 'reference'
    image_folder.convert(str(src), str(reference), split='train', domain='real',
                              records_per_shard=2)
    out = tmp_path / 'out'
    real_write_shard = shards._write_shard
    calls, kill_at = [], [2]

    def dies_after_one_shard(path, *args, **kwargs):
        calls.append(path)
        if len(calls) in kill_at:
            raise _Killed
        return real_write_shard(path, *args, **kwargs)

    monkeypatch.setattr(shards, '_write_shard', dies_after_one_shard)
    with pytest.raises(_Killed):
        image_folder.convert(str(src), str(out), split='train', domain='real',
                                  records_per_shard=2)
    first = out / 'train-00000-of-00003.array_record'
    stat = os.stat(first)
    progress = json.loads((out / 'train.progress.json').read_text())
    assert list(progress['shards']) == ['0'] and not (out / 'meta.json').exists()
    calls.clear()
    kill_at.clear()
    summary = image_folder.convert(str(src), str(out), split='train', domain='real',
                                        records_per_shard=2)
    assert len(calls) == 2 and summary['resumed_shards'] == 1
    assert os.stat(first).st_mtime_ns == stat.st_mtime_ns and os.stat(first).st_ino == stat.st_ino
    assert _shards(out) == _shards(reference)
    assert layout.read_meta(out) == {**layout.read_meta(reference), 'name': 'out'}
    np.testing.assert_array_equal(layout.read_labels(out, 'train'),
                                  layout.read_labels(reference, 'train'))
    assert not os.path.exists(out / 'train.progress.json')
    assert not [f for f in os.listdir(out) if f.startswith('.tmp')]
    # A re-run after completion writes everything again, identically.
    calls.clear()
    image_folder.convert(str(src), str(out), split='train', domain='real',
                              records_per_shard=2)
    assert len(calls) == 3 and _shards(out) == _shards(reference)


def test_changed_input_starts_over(tmp_path, monkeypatch):
    src = _folder(tmp_path)
    out = tmp_path / 'out'
    for split in ('train', 'val'):
        image_folder.convert(str(src), str(out), split=split, domain='real',
                                  records_per_shard=4)
    real_write_shard = shards._write_shard

    def dies_on_second(path, *args, **kwargs):
        if '-00001.' in os.path.basename(path):
            raise _Killed
        return real_write_shard(path, *args, **kwargs)

    # A rewrite with another shard layout dies half-way: the split leaves meta.json at the
    # start, and its old shards and labels go, so no reader sees old and new shards mixed.
    monkeypatch.setattr(shards, '_write_shard', dies_on_second)
    with pytest.raises(_Killed):
        image_folder.convert(str(src), str(out), split='train', domain='real',
                                  records_per_shard=2)
    assert set(layout.read_meta(out)['splits']) == {'val'}
    assert sorted(f for f in os.listdir(out) if f.startswith('train')) == [
        'train-00000-of-00003.array_record', 'train.progress.json']
    monkeypatch.setattr(shards, '_write_shard', real_write_shard)
    _write(src / 'a' / '9.jpg', _jpeg(9))          # the input changed: start over
    summary = image_folder.convert(str(src), str(out), split='train', domain='real',
                                        records_per_shard=2)
    assert summary['resumed_shards'] == 0 and summary['num_examples'] == 7
    assert sorted(f for f in os.listdir(out) if f.startswith('train')) == [
        *(f'train-0000{i}-of-00004.array_record' for i in range(4)), 'train.labels.npy']
    assert set(layout.read_meta(out)['splits']) == {'train', 'val'}


# TensorFlow Datasets (prepared as array_record, read without TensorFlow).

def _tfds_builder(tfds, name: str, splits: dict[str, list[dict]]):
    """A copy of the registered TFDS builder `name` whose splits are the given examples."""
    real = tfds.builder_cls(name)

    class Tiny(real, skip_registration=True):
        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(examples) for split, examples in
                    splits.items()}

        def _generate_examples(self, examples):
            yield from enumerate(examples)

    Tiny.name = name
    return Tiny


def test_tfds(tmp_path):
    tfds = pytest.importorskip('tensorflow_datasets')
    from sdtl_jax.datasets import tfds as tfds_importer

    mask = _png(np.ones((24, 32), np.uint8))
    pet = lambda i, label, fname: {  # noqa: E731
        'image': _jpeg(i), 'label': label, 'species': 0, 'file_name': fname,
        'segmentation_mask': mask, 'head_bbox': tfds.features.BBox(0.0, 0.0, 1.0, 1.0)}
    _tfds_builder(tfds, 'oxford_iiit_pet', {
        'train': [pet(0, 'Abyssinian', 'Abyssinian_1.jpg'), pet(1, 36, 'yorkshire_terrier_2.jpg')],
        'test': [pet(2, 5, 'Bengal_4.jpg')],
    })(data_dir=str(tmp_path / 'tfds'), file_format='array_record').download_and_prepare()
    image = lambda i, label, fname: {'image': _jpeg(i), 'label': label,  # noqa: E731
                                     'file_name': fname}
    _tfds_builder(tfds, 'imagenet2012', {
        'train': [image(3, A, f'{A}_1.JPEG'), image(4, OTHER, f'{OTHER}_1.JPEG'),
                  image(5, C, f'{C}_1.JPEG')],
        'validation': [image(6, B, 'ILSVRC2012_val_00000001.JPEG'),
                       image(7, -1, 'ILSVRC2012_val_00000002.JPEG')],
    })(data_dir=str(tmp_path / 'tfds'), file_format='array_record').download_and_prepare()

    pets_out = tmp_path / 'pets_real'
    assert cli.call(tfds_importer, ['--name=oxford_iiit_pet', f'--tfds_data_dir={tmp_path}/tfds',
                                  f'--out={pets_out}']) == 0
    got = sorted((r['label'], r['id']) for r in _read_all(pets_out, 'train'))
    assert got == [(0, 'Abyssinian_1.jpg'), (36, 'yorkshire_terrier_2.jpg')]
    assert [r['label'] for r in _read_all(pets_out, 'test')] == [5]
    assert layout.read_meta(pets_out)['classes'] == sources.class_list('pets')

    in_out = tmp_path / 'imagenet100_real'
    summaries = tfds_importer.import_tfds('imagenet2012', str(in_out),
                                        tfds_data_dir=str(tmp_path / 'tfds'))
    train = _read_all(in_out, 'train')
    assert sorted((r['label'], r['id']) for r in train) == [
        (WNIDS.index(A), f'{A}/{A}_1.JPEG'), (WNIDS.index(C), f'{C}/{C}_1.JPEG')]
    assert summaries[0]['skipped'] == {
        'TFDS classes outside the 100 classes of imagenet100_real': 1}
    val = _read_all(in_out, 'val')
    assert [(r['label'], r['id']) for r in val] == [
        (WNIDS.index(B), f'{B}/ILSVRC2012_val_00000001.JPEG')]
    listed = _unreadable(in_out, 'val')
    assert len(listed) == 1
    (source, reason), = listed.items()
    assert source.startswith('tfds:imagenet2012/validation[') and 'label -1' in reason
    assert 'ILSVRC2012_val_00000002.JPEG' in reason
    # Not prepared: the error says what to do.
    with pytest.raises(FileNotFoundError, match='array_record'):
        tfds_importer.import_tfds('oxford_iiit_pet', str(tmp_path / 'x'),
                                tfds_data_dir=str(tmp_path / 'empty'))


def test_missing_dataset_names_importer(tmp_path):
    for name, command in (('imagenet100_real', 'imagenet100'), ('pets_real', 'pets')):
        with pytest.raises(FileNotFoundError, match=f'python -m sdtl_jax.datasets.{command}'):
            sources.resolve(name, tmp_path, 'train')
