"""`bench.rehearsal --tiny`: every stage of the full-size rehearsal runs and reports its figures.

The toy run has the same stages as the full one (raw downloads made, imported with the real
importers, a baseline SIGKILLed after its first checkpoint and resumed, the N = 16 transfer from
it, the generator into shards), with small models, crops and images.
"""
import io
import re
import tarfile

import numpy as np
from PIL import Image

from bench import rehearsal, rehearsal_data, results
from sdtl_jax import cli
from sdtl_jax.data import sources


def test_tiny_rehearsal_runs_every_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(results, 'RESULTS', str(tmp_path / 'RESULTS.md'))
    args = cli.parse(rehearsal, ['--tiny', '--models=resnet50', '--append'])
    lines = rehearsal.run(args, str(tmp_path / 'root'))
    text = '\n'.join(lines)
    stages = {m[1]: m[2] for m in re.finditer(r'^  (\S.*?)\s{2,}\s*([0-9.]+ s, .*)$', text, re.M)}
    assert set(stages) == {'import imagenet100', 'import pets', 'resnet50 baseline',
                           'resnet50 resume', 'resnet50 transfer N=16', 'tiny random SD',
                           'generate 2 images'}, text
    # The 100 classes' train and val images; the source's 2 other classes are left out.
    assert re.search(r'images/s [0-9.]+ \(200 images\)', stages['import imagenet100'])
    assert 'killed after checkpoint 2' in stages['resnet50 baseline']
    for name in ('resnet50 baseline', 'resnet50 resume', 'resnet50 transfer N=16'):
        figures = stages[name]
        assert re.search(r'peak RSS +0\.[1-9]|peak RSS +[1-9]', figures), figures
        assert re.search(r'step [0-9.]+ s', figures) and re.search(r'checkpoint \d+ MiB', figures)
        assert re.search(r'jit\(train_step\) [0-9.]+ s', figures), figures
    assert re.search(r'images/s [0-9.]+ \(2 images', stages['generate 2 images'])
    recorded = (tmp_path / 'RESULTS.md').read_text()
    assert '### rehearsal, ' in recorded and '`python -m bench.rehearsal --tiny' in recorded
    assert lines[-1] in recorded


def test_raw_imagenet_is_shaped_like_the_download(tmp_path):
    made = rehearsal_data.make_imagenet(str(tmp_path), train_per_class=1, val_per_class=1,
                                        scale=0.1)
    wnids = sources.class_list('imagenet100')
    assert sorted(p.name for p in (tmp_path / 'train').iterdir()) == sorted(
        [*wnids, *rehearsal_data.OTHER_WNIDS])
    val = sorted(p.name for p in (tmp_path / 'val').iterdir())
    assert val[0] == 'ILSVRC2012_val_00000001.JPEG' and len(val) == 102 == made['images'] - 102
    with tarfile.open(made['devkit']) as tar:
        truth = tar.extractfile('ILSVRC2012_devkit_t12/data/'
                                'ILSVRC2012_validation_ground_truth.txt').read().split()
    assert len(truth) == 102 and len(set(truth)) == 102      # one image per class, all listed
    modes = {Image.open(p).mode for p in (tmp_path / 'val').iterdir()}
    assert modes == {'RGB', 'L', 'CMYK'}


def test_photos_compress_like_photos():
    data = rehearsal_data.encode_jpeg(rehearsal_data.photo(np.random.default_rng(0), 500, 375))
    assert 60_000 < len(data) < 160_000                       # ImageNet's JPEGs average ~110 KB
    assert Image.open(io.BytesIO(data)).size == (500, 375)
