"""Bad data at training time, reduced subsets, and disjoint per-process reading.

The importers' side of bad data (conversion, unreadable lists) is in test_importers.py.
"""
import os

import numpy as np
import pytest
from absl import flags

from sdtl_jax.data import input_pipeline, layout, reader, records, sources, subsets
from sdtl_jax.datasets import shards

flags.FLAGS.mark_as_parsed()

CLASSES = ['a', 'b', 'c', 'd']
AUG = {'name': 'multicrop', 'global_size': 8, 'local_size': 4, 'num_local': 1}
_PNG = records.encode_png(np.full((6, 6, 3), 90, np.uint8))


def _write(dataset_dir, images, labels, *, num_classes=len(CLASSES), records_per_shard=8,
           classes=CLASSES) -> sources.DatasetSplit:
    with shards.ShardWriter(dataset_dir, 'train', num_classes=num_classes,
                             records_per_shard=records_per_shard) as writer:
        for i, (image, label) in enumerate(zip(images, labels)):
            writer.write(image, label, f'img{i:05d}')
    info = writer.close()
    layout.write_meta(dataset_dir, 'bad', 'real', [str(c) for c in range(num_classes)],
                       {'train': info})
    split = sources.split_from_dir(dataset_dir, 'train')
    return sources.DatasetSplit(**{**split.__dict__, 'classes': list(classes)})


def _with_bad_record(tmp_path, bad_image=b'\x89PNG but then nothing', bad_label=1):
    """16 good records and, at index 11 (shard 1, record 3), one bad one."""
    images, labels = [_PNG] * 16, [i % 4 for i in range(16)]
    images[11], labels[11] = bad_image, bad_label
    return _write(tmp_path, images, labels)


def _drain(split, steps=4, **kwargs):
    it = iter(input_pipeline.train_dataset(split, global_batch=4, seed=0, aug=AUG,
                                           num_threads=1, **kwargs))
    return [next(it) for _ in range(steps)]


@pytest.mark.parametrize('bad', ['undecodable', 'truncated', 'label'])
def test_bad_record_stops_training_naming_shard_and_record(tmp_path, bad):
    jpeg = records.encode_jpeg(np.full((16, 16, 3), 50, np.uint8))
    bad_image = {'undecodable': b'\xff\xd8 not a jpeg', 'truncated': jpeg[:len(jpeg) // 2],
                 'label': _PNG}[bad]
    if bad == 'label':   # written with 8 classes, read as a dataset of 4
        images, labels = [_PNG] * 16, [i % 4 for i in range(16)]
        labels[11] = 6
        split = _write(tmp_path, images, labels, num_classes=8)
    else:
        split = _with_bad_record(tmp_path, bad_image)
    with pytest.raises(records.CorruptRecordError) as error:
        _drain(split)
    message = str(error.value)
    assert 'train-00001-of-00002.array_record, record 3' in message and 'img00011' in message
    assert 'skip_corrupt' in message
    if bad == 'label':
        assert 'label 6, outside the 4 classes' in message


def test_skip_corrupt_skips_logs_and_counts(tmp_path):
    split = _with_bad_record(tmp_path / 'data')
    workdir = tmp_path / 'run'
    workdir.mkdir()
    log = str(workdir / reader.SKIP_LOG)
    batches = _drain(split, steps=8, skip_corrupt=True, skip_log=log)   # two epochs
    # Every batch stays full: a random readable record takes the skipped one's place.
    assert all(b['global'].shape == (4, 1, 8, 8, 3) for b in batches)
    with open(log) as f:
        lines = f.read().splitlines()
    assert len(lines) == 2 and all('train-00001-of-00002.array_record, record 3' in line
                                   for line in lines)
    assert reader.count_skipped(str(workdir)) == 1        # the same record in both epochs
    # Evaluation skips it too and keeps every other image once, the rest being padding.
    batches = list(input_pipeline.eval_batches(split, global_batch=8, resize=8, crop=8,
                                                skip_corrupt=True, skip_log=log))
    assert len(batches) == 2 and sum(b['mask'].sum() for b in batches) == 15
    with pytest.raises(records.CorruptRecordError, match='record 3'):
        list(input_pipeline.eval_batches(split, global_batch=8, resize=8, crop=8))


def test_unreadable_shard_is_named_before_training(tmp_path):
    split = _with_bad_record(tmp_path)
    with open(split.files[1], 'r+b') as f:     # damaged inside: the record that reads it fails
        f.write(b'garbage' * 40)
    with pytest.raises(records.CorruptRecordError, match='train-00001-of-00002'):
        _drain(split)
    with open(split.files[1], 'wb') as f:      # not an ArrayRecord file at all
        f.write(b'garbage' * 100)
    with pytest.raises(ValueError, match='Cannot read shard .*train-00001-of-00002'):
        input_pipeline.train_dataset(split, global_batch=4, seed=0, aug=AUG)
    os.remove(split.files[0])
    with pytest.raises(FileNotFoundError, match='train-00000-of-00002'):
        sources.split_from_dir(tmp_path, 'train')


@pytest.fixture(scope='module')
def ten_thousand(tmp_path_factory):
    """10,000 tiny records, 10 classes of unequal size (class c holds about 2c + 1 shares)."""
    labels = np.repeat(np.arange(10), np.round(10_000 * (2 * np.arange(10) + 1) / 100)
                       .astype(int))
    assert len(labels) == 10_000
    labels = np.random.default_rng(0).permutation(labels)
    return _write(tmp_path_factory.mktemp('big'), [_PNG] * 10_000, labels, num_classes=10,
                  records_per_shard=2048, classes=[str(c) for c in range(10)])


def test_train_fraction_subset(ten_thousand, tmp_path):
    split = ten_thousand
    chosen = subsets.select(split, fraction=1 / 8, stratify=False, seed=0, workdir=tmp_path)
    assert len(chosen) == 1250 and len(set(chosen.tolist())) == 1250
    stored = (tmp_path / subsets.SUBSET_FILE).read_text()
    again = subsets.select(split, fraction=1 / 8, stratify=False, seed=0, workdir=tmp_path)
    np.testing.assert_array_equal(chosen, again)                 # rerun / resume / other host
    assert (tmp_path / subsets.SUBSET_FILE).read_text() == stored
    other = subsets.select(split, fraction=1 / 8, stratify=False, seed=1)
    assert len(set(other.tolist()) & set(chosen.tolist())) < 400  # ~1250/8 expected overlap
    with pytest.raises(ValueError, match='another training subset'):
        subsets.select(split, fraction=1 / 4, stratify=False, seed=0, workdir=tmp_path)
    assert subsets.select(split, fraction=1.0, stratify=False, seed=0) is None
    for x in range(8):
        size = len(subsets.select(split, fraction=1 / 2 ** x, stratify=False, seed=0)
                   if x else np.arange(10_000))
        assert size == int(10_000 / 2 ** x + 0.5)      # halves round up: 312.5 -> 313
    with pytest.raises(ValueError, match=r'train_fraction must be in \(0, 1\]'):
        subsets.select(split, fraction=0.0, stratify=False, seed=0)


def test_stratified_subset_keeps_class_shares(ten_thousand):
    labels = layout.read_labels(os.path.dirname(ten_thousand.files[0]), 'train')
    assert labels is not None                     # the writer's sidecar, no records read
    chosen = subsets.select(ten_thousand, fraction=1 / 16, stratify=True, seed=0)
    assert len(chosen) == 625
    counts = np.bincount(labels[chosen], minlength=10)
    want = np.bincount(labels, minlength=10) / 16
    assert np.all(np.abs(counts - want) < 1)      # each class within rounding of its share
    uniform = np.bincount(labels[subsets.select(ten_thousand, fraction=1 / 16, stratify=False,
                                                seed=0)], minlength=10)
    assert np.abs(uniform - want).max() > 1       # a uniform draw does not keep them exactly


@pytest.mark.parametrize('global_batch', [8, 12])
def test_two_processes_read_disjoint_halves_of_the_subset(ten_thousand, global_batch):
    indices = subsets.select(ten_thousand, fraction=1 / 128, stratify=False, seed=3)   # 78
    used = input_pipeline.steps_per_epoch(len(indices), global_batch) * global_batch
    whole = input_pipeline.train_records(ten_thousand, global_batch=global_batch, seed=3,
                                         indices=indices)
    parts = [input_pipeline.train_records(ten_thousand, global_batch=global_batch, seed=3,
                                          process_index=p, process_count=2, indices=indices)
             for p in range(2)]

    def where(dataset, start, stop):
        return [dataset[i]['where'] for i in range(start, stop)]

    for epoch in range(2):
        mine = [where(p, epoch * used // 2, (epoch + 1) * used // 2) for p in parts]
        assert not set(mine[0]) & set(mine[1])
        assert set(mine[0]) | set(mine[1]) == set(where(whole, epoch * used, (epoch + 1) * used))
        assert len(set(mine[0] + mine[1])) == used
    allowed = {reader.RecordReader(ten_thousand).where(int(i)) for i in indices}
    assert set(where(whole, 0, used)) <= allowed
