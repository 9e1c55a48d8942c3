"""Tests of sdtl_jax.data: record format, registry, transforms, grain pipelines, demo data."""
import io
import json
import os

import numpy as np
import pytest
from absl import flags
from PIL import Image

from sdtl_jax.data import input_pipeline, layout, records, sources, subsets
from sdtl_jax.data.augment import eval_view, multicrop, photometric
from sdtl_jax.datasets import digits, shards
from sdtl_jax.datasets.generate import generator

# grain reads absl flags; conftest.py does this too, but the module must also run on its own.
flags.FLAGS.mark_as_parsed()

NUM_TINY, TINY_CLASSES = 64, ['a', 'b', 'c', 'd']
AUG = {'name': 'multicrop', 'global_size': 16, 'local_size': 8, 'num_global': 2, 'num_local': 3,
       'global_scale': (0.25, 1.0), 'local_scale': (0.05, 0.25)}


def _tiny_image(i: int) -> np.ndarray:
    """12x10 (HxW) RGB image whose left column encodes i (survives resize 10, crop 10)."""
    image = np.random.default_rng(i).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    image[:, 0] = (i, 255 - i, 7)
    return image


def _write_tiny(dataset_dir, n: int = NUM_TINY, split: str = 'train',
                records_per_shard: int = 20) -> sources.DatasetSplit:
    with shards.ShardWriter(dataset_dir, split, num_classes=len(TINY_CLASSES),
                             records_per_shard=records_per_shard) as writer:
        for i in range(n):
            writer.write(records.encode_png(_tiny_image(i)), i % len(TINY_CLASSES), f'img{i:03d}')
    layout.write_meta(dataset_dir, 'tiny', 'real', TINY_CLASSES, {split: writer.close()})
    return sources.split_from_dir(dataset_dir, split)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return _write_tiny(tmp_path_factory.mktemp('tiny'))


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
    return digits.ensure_demo_data(tmp_path_factory.mktemp('demo_data'))


def _ids(dataset, start: int, stop: int) -> list[str]:
    """Record ids of a raw source (bytes) or of a `reader.RecordReader` stream."""
    elements = (dataset[i] for i in range(start, stop))
    return [records.decode_record(e['record'] if isinstance(e, dict) else e)['id']
            for e in elements]


# Records and meta.json.

def test_record_round_trip():
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    data = records.encode_record(records.encode_png(image), 3, 'x/1', {'seed': 7, 'prompt': 'p'})
    record = records.decode_record(data)
    assert (record['label'], record['id'], record['meta']) == (3, 'x/1', {'seed': 7, 'prompt': 'p'})
    np.testing.assert_array_equal(records.decode_image(record['image']), image)
    assert records.decode_record(records.encode_record(b'jpg', 0, 'y'))['meta'] == {}
    assert records.decode_image(records.encode_jpeg(image)).shape == (4, 4, 3)


def test_shard_writer_and_meta(tmp_path):
    split = _write_tiny(tmp_path, n=10, records_per_shard=4)
    names = [os.path.basename(f) for f in split.files]
    assert names == [f'train-0000{i}-of-00003.array_record' for i in range(3)]
    meta = layout.read_meta(tmp_path)
    assert meta['name'] == 'tiny' and meta['domain'] == 'real' and meta['classes'] == TINY_CLASSES
    assert meta['splits']['train'] == {'files': names, 'num_examples': 10,
                                       'class_counts': [3, 3, 2, 2]}
    import grain
    source = grain.sources.ArrayRecordDataSource(split.files)
    assert _ids(source, 0, 10) == [f'img{i:03d}' for i in range(10)]
    np.testing.assert_array_equal(layout.read_labels(tmp_path, 'train'),
                                  [i % len(TINY_CLASSES) for i in range(10)])
    assert layout.read_labels(tmp_path, 'val') is None     # e.g. written before the sidecar
    # Rewriting the split with another shard count leaves no stale shards behind.
    split = _write_tiny(tmp_path, n=10, records_per_shard=10)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith('.array_record')) == [
        'train-00000-of-00001.array_record']
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.tmp')]


def test_read_meta_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'nope')):
        layout.read_meta(tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match='meta.json is missing'):
        layout.read_meta(tmp_path)
    (tmp_path / 'meta.json').write_text('{"name": ')
    with pytest.raises(ValueError, match='meta.json is not valid JSON'):
        layout.read_meta(tmp_path)
    (tmp_path / 'meta.json').write_text('{"name": "x"}')
    with pytest.raises(ValueError, match='missing fields'):
        layout.read_meta(tmp_path)


# Registry.

def test_registry_classes():
    assert len(sources.get('imagenet100_real').classes) == 100
    assert sources.get('imagenet100_real').classes == sorted(
        sources.get('imagenet100_synth').classes)
    pets = sources.get('pets_real').classes
    assert len(pets) == 37 and pets[:2] == ['Abyssinian', 'american_bulldog']
    assert sources.get('digits_real').classes == [str(d) for d in range(10)]


def test_resolve_errors(tmp_path):
    with pytest.raises(ValueError, match='imagenet100_real'):
        sources.resolve('imagenet1k', tmp_path, 'train')
    with pytest.raises(FileNotFoundError) as e:
        sources.resolve('imagenet100_real', tmp_path, 'val')
    message = str(e.value)
    assert str(tmp_path / 'imagenet100_real') in message
    assert 'meta.json' in message and 'val-NNNNN-of-MMMMM.array_record' in message
    assert 'python -m sdtl_jax.datasets.image_folder' in message
    # A class list that differs from the registry's.
    layout.write_meta(tmp_path / 'pets_real', 'pets_real', 'real', ['cat', 'dog'],
                       {'test': {'files': [], 'num_examples': 0, 'class_counts': [0, 0]}})
    with pytest.raises(ValueError, match='registry order'):
        sources.resolve('pets_real', tmp_path, 'test')


def test_default_data_dir(monkeypatch):
    monkeypatch.setenv('SDTL_DATA_DIR', '/some/where')
    assert layout.default_data_dir() == '/some/where'
    monkeypatch.delenv('SDTL_DATA_DIR')
    assert layout.default_data_dir().endswith(os.path.join('.cache', 'sdtl_jax', 'data'))


# Transforms.

def _png(array, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format='PNG' if mode != 'CMYK' else 'JPEG')
    return buf.getvalue()


def test_decode_modes():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgba = np.full((8, 8, 4), 200, np.uint8)
    cmyk = Image.new('CMYK', (8, 8), (0, 255, 255, 0))
    buf = io.BytesIO()
    cmyk.save(buf, format='JPEG')
    deep = Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8))
    deep_buf = io.BytesIO()
    deep.save(deep_buf, format='PNG')
    for data in (_png(gray), _png(rgba), buf.getvalue(), deep_buf.getvalue()):
        image = records.decode_image(data)
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(records.decode_image(_png(gray))[..., 1], gray)
    # 16-bit is rescaled to 0..255, not clipped.
    assert records.decode_image(deep_buf.getvalue()).max() == round(63000 * 255 / 65535)
    with pytest.raises(ValueError, match="record 'bad/7'"):
        records.decode_image(b'not an image', 'bad/7')


def test_multicrop_and_eval_transform():
    record = records.encode_record(records.encode_jpeg(_tiny_image(5)), 2, 'x')
    crop = multicrop.MultiCrop(**{k: v for k, v in AUG.items() if k != 'name'})
    out = crop.random_map(record, np.random.default_rng(0))
    assert out['global'].shape == (2, 16, 16, 3) and out['global'].dtype == np.uint8
    assert out['local'].shape == (3, 8, 8, 3) and out['local'].dtype == np.uint8
    assert out['label'] == 2 and out['label'].dtype == np.int32
    assert out['global'].max() > 0 and out['global'].min() >= 0
    again = crop.random_map(record, np.random.default_rng(0))
    np.testing.assert_array_equal(out['local'], again['local'])
    no_local = multicrop.MultiCrop(global_size=16, num_local=0)
    assert 'local' not in no_local.random_map(record, np.random.default_rng(0))
    # The crop box always lies inside the image, also in the centre-crop fallback.
    rng = np.random.default_rng(1)
    for h, w, scale in ((100, 10, (0.9, 1.0)), (10, 100, (0.9, 1.0)), (37, 53, (0.05, 0.25))):
        top, left, ch, cw = multicrop.random_resized_crop_box(h, w, scale, (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch * cw > 0
    image = eval_view.EvalTransform(resize=20, crop=16).map(
        {'image': records.encode_png(_tiny_image(1)), 'label': 1, 'id': 'y'})['image']
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8


# Pipelines.

def test_train_batches(tiny):
    ds = input_pipeline.train_dataset(tiny, global_batch=8, seed=0, aug=AUG, num_threads=2)
    batch = next(iter(ds))
    assert batch['global'].shape == (8, 2, 16, 16, 3) and batch['global'].dtype == np.uint8
    assert batch['local'].shape == (8, 3, 8, 8, 3) and batch['local'].dtype == np.uint8
    assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
    assert batch['global_ops'].shape == (8, 2, photometric.NUM_OPS)
    assert batch['local_ops'].shape == (8, 3, photometric.NUM_OPS)
    no_local = dict(AUG, num_local=0)
    batch = next(iter(input_pipeline.train_dataset(tiny, global_batch=8, seed=0, aug=no_local)))
    assert set(batch) == {'global', 'global_ops', 'label'}
    assert input_pipeline.steps_per_epoch(tiny.num_examples, 12) == 5


def test_train_deterministic(tiny):
    def first(seed, num_threads):
        it = iter(input_pipeline.train_dataset(tiny, global_batch=8, seed=seed, aug=AUG,
                                               num_threads=num_threads))
        return [next(it) for _ in range(3)]

    a, b, c = first(0, 1), first(0, 4), first(1, 2)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]['global'], c[0]['global'])
    # Worker processes (the default on real data) give the very same batches.
    it = iter(input_pipeline.train_dataset(tiny, global_batch=8, seed=0, aug=AUG,
                                           num_workers=2))
    for x in a:
        y = next(it)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    it.close()


def test_epochs_reshuffle(tiny):
    stream = input_pipeline.train_records(tiny, global_batch=8, seed=0)
    epochs = [_ids(stream, e * NUM_TINY, (e + 1) * NUM_TINY) for e in range(3)]
    for ids in epochs:
        assert sorted(ids) == [f'img{i:03d}' for i in range(NUM_TINY)]
    assert epochs[0] != epochs[1] != epochs[2]
    other = input_pipeline.train_records(tiny, global_batch=8, seed=1)
    # Seeds are hashed: seed 1 does not replay seed 0's next epoch.
    assert _ids(other, 0, NUM_TINY) not in epochs


@pytest.mark.parametrize('global_batch', [8, 12])
def test_process_parts_disjoint(tiny, global_batch):
    used = input_pipeline.steps_per_epoch(NUM_TINY, global_batch) * global_batch
    parts = [input_pipeline.train_records(tiny, global_batch=global_batch, seed=0,
                                          process_index=p, process_count=2) for p in range(2)]
    for epoch in range(2):
        ids = [_ids(d, epoch * used // 2, (epoch + 1) * used // 2) for d in parts]
        assert not set(ids[0]) & set(ids[1])
        whole = input_pipeline.train_records(tiny, global_batch=global_batch, seed=0)
        assert set(ids[0]) | set(ids[1]) == set(_ids(whole, epoch * used, (epoch + 1) * used))
        assert len(set(ids[0] + ids[1])) == used
    batch = next(iter(input_pipeline.train_dataset(tiny, global_batch=8, seed=0, aug=AUG,
                                                   process_index=1, process_count=2)))
    assert batch['global'].shape[0] == 4


def test_subset_stream(tiny):
    indices = subsets.uniform(NUM_TINY, 16, seed=0)
    stream = input_pipeline.train_records(tiny, global_batch=8, seed=0, indices=indices)
    assert {int(i[3:]) for i in _ids(stream, 0, 16)} == set(indices.tolist())
    assert len(set(_ids(stream, 0, 16))) == 16 and set(_ids(stream, 0, 16)) == set(
        _ids(stream, 16, 32))


@pytest.mark.parametrize('num_workers', [0, 2])
def test_iterator_state(tiny, num_workers):
    def pipeline():
        return iter(input_pipeline.train_dataset(tiny, global_batch=8, seed=3, aug=AUG,
                                                 num_workers=num_workers))

    it = pipeline()
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    it.close()
    restored = pipeline()
    restored.set_state(json.loads(json.dumps(state)))  # the state survives serialisation
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    restored.close()


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_every_example_once(tmp_path, process_count):
    split = _write_tiny(tmp_path, n=10, split='val')
    seen, counts = [], []
    for p in range(process_count):
        batches = list(input_pipeline.eval_batches(
            split, global_batch=4, resize=10, crop=10, process_index=p,
            process_count=process_count))
        counts.append(len(batches))
        for b in batches:
            assert b['image'].shape == (4 // process_count, 10, 10, 3)
            assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
            seen += [int(i) for i in b['image'][b['mask'], 0, 0, 0]]
            assert (b['label'][b['mask']] == b['image'][b['mask'], 0, 0, 0] % 4).all()
    assert sorted(seen) == list(range(10))
    assert len(set(counts)) == 1  # every process runs the same number of batches
    if process_count == 1:
        assert counts == [3]
        last = list(input_pipeline.eval_batches(split, global_batch=4, resize=10, crop=10))[-1]
        assert last['mask'].tolist() == [True, True, False, False]


# Demo data.

def test_demo_real_split(demo_dir):
    train = sources.resolve('digits_real', demo_dir, 'train')
    val = sources.resolve('digits_real', demo_dir, 'val')
    assert train.num_examples + val.num_examples == 1797 and val.num_examples == 360
    totals = np.add(train.class_counts, val.class_counts)
    # Stratified: every class is split 80/20 to within one image.
    assert np.all(np.abs(np.asarray(val.class_counts) - 0.2 * totals) <= 1)
    x, y = digits.load_arrays(val)
    assert x.shape == (360, 64) and x.max() == 16 and x.min() == 0
    synth = sources.resolve('digits_synth', demo_dir, 'train')
    assert synth.domain == 'synth' and synth.class_counts == [200] * 10


def test_demo_synth_provenance(demo_dir):
    import grain
    split = sources.resolve('digits_synth', demo_dir, 'train')
    record = records.decode_record(grain.sources.ArrayRecordDataSource(split.files)[0])
    meta = record['meta']
    assert {'generator', 'prompt', 'seed', 'class', 'font', 'rotation', 'shear',
            'stroke_width'} <= set(meta)
    assert meta['generator'] == 'font_digits' and meta['prompt'] == 'zero'
    assert meta['seed'] == generator.derive_seed(digits.SYNTH_SEEDS['train'], 0, 0)
    gen = digits.FontDigitGenerator()
    assert isinstance(gen, generator.Generator)
    request = generator.GenerationRequest(3, '3', 'three', seed=meta['seed'], index=0)
    a, b = gen.generate([request, request])
    np.testing.assert_array_equal(a.image, b.image)
    assert a.image.shape == (8, 8) and set(np.unique(digits.from_png_levels(a.image))) <= set(
        range(17))
    assert len(digits.usable_fonts()) >= 15
    assert not any(s in f for f in digits.usable_fonts() for s in ('cmsy10', 'cmex10', 'Display'))


def test_demo_linear_probe_gap(demo_dir):
    result = digits.linear_probe_gap(demo_dir)
    assert result['real_to_real'] > 90
    assert 20 < result['synth_to_real'] < result['real_to_real'] - 25


def test_demo_concurrent_first_use(tmp_path):
    import threading

    errors = []

    def build():
        try:
            digits.ensure_demo_data(tmp_path)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(os.listdir(tmp_path)) == ['.digits_demo.lock', 'digits_real', 'digits_synth']
    assert sources.resolve('digits_synth', tmp_path, 'val').num_examples == 500
