"""The Stable Diffusion generator on tiny random pipelines (sdtl_jax.datasets.generate.tiny), on
CPU."""
import importlib.util
import io
import json
import os
import pathlib

import numpy as np
import pytest

pytest.importorskip('diffusers')
torch = pytest.importorskip('torch')

from sdtl_jax.data import layout, records, sources  # noqa: E402
from sdtl_jax.datasets.generate import __main__ as cli  # noqa: E402
from sdtl_jax.datasets.generate import diffusion, generator, prompts, tiny  # noqa: E402

ROOT = pathlib.Path(__file__).parent.parent
CLASSES = sources.class_list('imagenet100')
PICKED = (3, 40)      # the labels of the two classes the tests generate


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / 'generate' /
                                                  f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope='module')
def tiny_sd(tmp_path_factory):
    return tiny.write_tiny_sd(str(tmp_path_factory.mktemp('tiny_sd')))


def tiny_config(model, **overrides):
    """2 classes x 4 images (a batch of the smoke training config), 2 steps, 64 x 48 px,
    2 images per shard (4 shards)."""
    c = load_config('imagenet100_sd14')
    c.update(dict(model=model, classes=','.join(CLASSES[i] for i in PICKED), images_per_class=4,
                  steps=2, width=64, height=48, records_per_shard=2, batch_size=2,
                  image_format='png'))
    c.update(overrides)
    return c


def read_records(out_dir, split='train'):
    import grain
    meta = layout.read_meta(out_dir)
    files = [os.path.join(out_dir, f) for f in meta['splits'][split]['files']]
    source = grain.sources.ArrayRecordDataSource(files)
    return [records.decode_record(source[i]) for i in range(len(source))]


def decode(record):
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(record['image'])))


def make_generator(model, **overrides):
    c = tiny_config(model, **overrides)
    pipe, info = diffusion.load_pipeline(c.model, safety_checker=c.safety_checker)
    speed = diffusion.optimize(pipe, attention=c.attention, channels_last=c.channels_last)
    return diffusion.DiffusionGenerator(pipe, info, steps=c.steps, guidance=c.guidance,
                                        width=c.width, height=c.height,
                                        max_resamples=c.max_resamples, speed=speed)


@pytest.fixture(scope='module')
def generated(tiny_sd, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('gen') / 'imagenet100_synth')
    summary = cli.run(tiny_config(tiny_sd), out)
    return out, summary


def test_generates_every_class_index_once_with_provenance(generated, tiny_sd):
    out, summary = generated
    recs = read_records(out)
    expected = {(c, i) for c in PICKED for i in range(4)}
    assert sorted((r['meta']['class'], r['meta']['index']) for r in recs) == sorted(expected)
    assert summary['num_examples'] == 8 and len(summary['files']) == 4
    assert [summary['class_counts'][c] for c in PICKED] == [4, 4]
    assert sum(summary['class_counts']) == 8 and summary['num_resamples'] == 0
    assert generator.format_summary(summary).startswith(
        '[imagenet100_synth/train] 8 images in 4 shards: 4 per class for 2 classes; 0 re-sampled')
    assert layout.read_labels(out, 'train').tolist() == [r['label'] for r in recs]
    definitions = {c['wnid']: c for c in sources.load_reference('imagenet100.json')['classes']}
    for r in recs:
        meta, c = r['meta'], r['meta']['class']
        assert r['label'] == c and r['id'] == f'imagenet100_synth/train/{c:04d}/{meta["index"]:06d}'
        assert meta['prompt'] == definitions[CLASSES[c]]['prompt_c_d']
        assert meta['seed'] == generator.derive_seed(0, c, meta['index'])
        assert meta['model'] == tiny_sd and meta['scheduler'] == 'PNDMScheduler'
        assert (meta['steps'], meta['guidance'], meta['width'], meta['height']) == (2, 2.0, 64,
                                                                                    48)
        assert meta['negative_prompt'] == '' and meta['revision'] == ''
        assert meta['pipeline'] == 'StableDiffusionPipeline' and meta['safety_checker'] is True
        assert {'torch', 'diffusers', 'transformers', 'sdtl_jax'} <= set(meta['versions'])
        assert meta['speed'] == {'attention': 'sdpa', 'channels_last': True, 'compile': '',
                                 'vae_slicing': False}
        assert meta['batch_seeds'][meta['batch_position']] == meta['seed']
        assert decode(r).shape == (48, 64, 3)
    # Different seeds give different images.
    assert len({decode(r).tobytes() for r in recs}) == 8
    assert json.load(open(os.path.join(out, 'train.summary.json')))['num_examples'] == 8


def test_provenance_regenerates_the_same_pixels(generated, tiny_sd):
    out, _ = generated
    gen = make_generator(tiny_sd)
    for record in read_records(out)[::2]:
        np.testing.assert_array_equal(diffusion.regenerate(gen, record['meta']), decode(record))
    other = make_generator(tiny_sd)
    other.steps = 3
    with pytest.raises(ValueError, match='steps'):
        diffusion.regenerate(other, read_records(out)[0]['meta'])


def test_rerun_is_a_no_op_and_other_settings_are_refused(generated, tiny_sd):
    out, _ = generated
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)
              if f.endswith('.array_record')}
    assert cli.run(tiny_config(tiny_sd), out)['num_examples'] == 8
    assert before == {f: os.path.getmtime(os.path.join(out, f)) for f in before}
    with pytest.raises(ValueError, match=r'settings\.steps \(2 -> 3\)'):
        cli.run(tiny_config(tiny_sd, steps=3), out)


class Interrupted(Exception):
    pass


class DiesAfter:
    """Wraps a generator; raises (as a kill would stop it) on the n-th `generate` call."""

    def __init__(self, inner, calls):
        self.inner, self.name, self.calls, self.seen = inner, inner.name, calls, 0

    def generate(self, requests):
        self.seen += 1
        if self.seen == self.calls:
            raise Interrupted
        return self.inner.generate(requests)


def write(gen, out, requests, **kwargs):
    return generator.write_generated_split(
        gen, requests, out_dir=out, name='imagenet100_synth', classes=CLASSES,
        settings=gen.settings() if hasattr(gen, 'settings') else gen.inner.settings(),
        requests_per_shard=2, batch_size=1, verbose=False, **kwargs)


def test_killed_run_resumes_to_the_exact_set(tiny_sd, tmp_path):
    gen = make_generator(tiny_sd)
    requests = generator.requests_for(
        CLASSES, prompts.class_prompts('imagenet100', 'c_d', 'lemma'), 3, 0, class_indices=PICKED)
    out = str(tmp_path / 'ds')
    # Dies in the middle of the second shard (3rd single-image batch): shard 0 is finished.
    with pytest.raises(Interrupted):
        write(DiesAfter(gen, 4), out, requests)
    assert sorted(f for f in os.listdir(out) if f.endswith('.array_record')) == [
        'train-00000-of-00003.array_record']
    assert not os.path.exists(os.path.join(out, 'meta.json'))
    # What a SIGKILL leaves behind: a half-written shard under its temporary name.
    with open(os.path.join(out, '.tmp-train-00001.99999'), 'wb') as f:
        f.write(b'half a shard')
    resumed = DiesAfter(gen, 0)
    summary = write(resumed, out, requests)
    assert resumed.seen == 4           # shards 1 and 2 only
    assert not [f for f in os.listdir(out) if f.startswith('.tmp')]
    assert summary['num_examples'] == 6
    uninterrupted = str(tmp_path / 'uninterrupted')
    write(gen, uninterrupted, requests)
    assert read_records(out) == read_records(uninterrupted)   # ids, images and provenance


def test_workers_split_the_shards_and_the_last_one_merges(tiny_sd, tmp_path):
    gen = make_generator(tiny_sd)
    requests = generator.requests_for(
        CLASSES, prompts.class_prompts('imagenet100', 'c_d', 'lemma'), 3, 0, class_indices=PICKED)
    out = str(tmp_path / 'ds')
    counted = DiesAfter(gen, 0)
    assert write(counted, out, requests, num_workers=2, worker_index=1) is None
    assert counted.seen == 2           # shard 1 of 0..2
    assert sorted(f for f in os.listdir(out) if f.endswith('.array_record')) == [
        'train-00001-of-00003.array_record']
    with pytest.raises(FileNotFoundError, match='2 of 3 shards'):
        generator.merge(out)
    summary = write(DiesAfter(gen, 0), out, requests, num_workers=2, worker_index=0)
    ids = [r['id'] for r in read_records(out)]
    assert summary['num_examples'] == 6 and len(set(ids)) == 6
    assert generator.merge(out, verbose=False)['num_examples'] == 6


class FlagsBright(torch.nn.Module):
    """Stands in for the safety checker: 'fires' on images brighter than `threshold`, and blanks
    them as StableDiffusionSafetyChecker does."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold = threshold
        self.register_buffer('anchor', torch.zeros(1))   # the pipeline reads device and dtype

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, images, clip_input):
        # SD's pipeline hands over the VAE's output, in [-1, 1].
        means = [(float(image.float().clamp(-1, 1).mean()) + 1) / 2 for image in images]
        flagged = [m > self.threshold for m in means]
        for i, f in enumerate(flagged):
            if f:
                images[i] = images[i] * 0
        return images, flagged


def test_flagged_images_are_resampled_with_the_next_seed(tiny_sd, tmp_path):
    gen = make_generator(tiny_sd)
    requests = generator.requests_for(
        CLASSES, prompts.class_prompts('imagenet100', 'c_d', 'lemma'), 3, 0, class_indices=PICKED)
    first, _ = gen.run([r.prompt for r in requests], [r.seed for r in requests])
    threshold = float(np.median(first.reshape(len(requests), -1).mean(1))) / 255
    gen.pipe.safety_checker = FlagsBright(threshold)
    summary = write(gen, str(tmp_path / 'ds'), requests)
    recs = read_records(str(tmp_path / 'ds'))
    resampled = [r for r in recs if r['meta']['resamples']]
    assert 1 <= len(resampled) < len(recs)
    for r in recs:
        image = decode(r)
        assert image.mean() / 255 <= threshold + 0.01 and image.max() > 0   # never a blank image
        request = requests[[q.index + 3 * PICKED.index(q.class_index) for q in requests].index(
            r['meta']['index'] + 3 * PICKED.index(r['meta']['class']))]
        assert r['meta']['seed'] == request.seed_for(r['meta']['resamples'])
    gen.pipe.safety_checker = None      # the stored image regenerates from its final seed
    np.testing.assert_array_equal(diffusion.regenerate(gen, {**resampled[0]['meta'],
                                                             'safety_checker': True}),
                                  decode(resampled[0]))
    per_class = [summary['resamples'][c] for c in PICKED]
    assert sum(per_class) == sum(r['meta']['resamples'] for r in recs) == summary[
        'num_resamples'] >= 1


def test_an_image_flagged_every_time_stops_the_run(tiny_sd):
    gen = make_generator(tiny_sd, max_resamples=2)
    gen.pipe.safety_checker = FlagsBright(-1.0)
    request = generator.requests_for(CLASSES, ['a prompt'] * len(CLASSES), 1, 0,
                                     class_indices=[7])
    with pytest.raises(RuntimeError, match=f"all 3 samples of class '{CLASSES[7]}' index 0"):
        gen.generate(request)


class RunsOutOfMemoryUnlessSliced:
    """A pipeline whose batch fits in GPU memory only once the VAE decodes image by image."""

    def __init__(self):
        import types
        self.sliced = False
        self.vae = types.SimpleNamespace(enable_slicing=lambda: setattr(self, 'sliced', True))

    def __call__(self, prompt, **kwargs):
        import types
        if not self.sliced:
            raise torch.OutOfMemoryError('CUDA out of memory')
        return types.SimpleNamespace(images=np.full((len(prompt), 4, 4, 3), 0.5, np.float32))


def test_out_of_memory_switches_vae_slicing_on_once(capsys):
    gen = diffusion.DiffusionGenerator(RunsOutOfMemoryUnlessSliced(), {},
                                       speed={'vae_slicing': False})
    images, flagged = gen.run(['a', 'b'], [1, 2])
    assert images.shape == (2, 4, 4, 3) and (images == 128).all() and flagged == [False] * 2
    assert gen.speed['vae_slicing'] is True and 'one image at a time' in capsys.readouterr().err
    gen.pipe.sliced = False     # out of memory even with slicing: stop with what to do
    with pytest.raises(RuntimeError, match='lower --config.batch_size'):
        gen.run(['a'], [1])


def test_disabled_safety_checker_warns(tiny_sd, capsys):
    _, info = diffusion.load_pipeline(tiny_sd, safety_checker=False)
    assert info['safety_checker'] is False
    assert 'safety checker is disabled' in capsys.readouterr().err


def test_missing_weights_say_how_to_point_at_local_ones(tmp_path):
    with pytest.raises(diffusion.ModelNotFoundError, match='does not exist'):
        diffusion.load_pipeline(str(tmp_path / 'nowhere'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(diffusion.ModelNotFoundError, match='no model_index.json'):
        diffusion.load_pipeline(str(tmp_path / 'empty'))
    with pytest.raises(diffusion.ModelNotFoundError) as e:
        diffusion.load_pipeline('sdtl-jax-tests/not-a-model', local_files_only=True)
    assert 'hf download sdtl-jax-tests/not-a-model --local-dir DIR' in str(e.value)
    assert '--config.model=DIR' in str(e.value)


def test_sdxl_pipeline_generates_pets(tmp_path):
    model = tiny.write_tiny_sdxl(str(tmp_path / 'tiny_sdxl'))
    c = load_config('pets_sdxl')
    c.update(dict(model=model, classes='0,36', images_per_class=1, steps=2, width=64,
                  height=64, image_format='jpeg'))
    out = str(tmp_path / 'pets_synth')
    assert cli.run(c, out)['num_examples'] == 2
    recs = read_records(out)
    assert [r['meta']['prompt'] for r in recs] == [
        p['clip_prompt'] for p in sources.load_reference('pets37.json')['classes']
        if p['label'] in (0, 36)]
    assert recs[0]['meta']['pipeline'] == 'StableDiffusionXLPipeline'
    assert recs[0]['image'][:2] == b'\xff\xd8' and decode(recs[0]).shape == (64, 64, 3)
    assert sources.resolve('pets_synth', str(tmp_path)).num_examples == 2


def test_training_loader_reads_the_generated_shards(generated):
    """The shards feed the training and evaluation pipelines of a smoke run (multi-crop)."""
    from test_train import smoke

    from sdtl_jax.data import input_pipeline
    out, _ = generated
    config = smoke('baseline', 'domain=synth', os.path.dirname(out))
    split = sources.resolve('imagenet100_synth', os.path.dirname(out), 'train')
    batch = next(iter(input_pipeline.train_dataset(
        split, global_batch=config.global_batch, seed=0, aug=config.aug.to_dict())))
    assert batch['global'].shape == (8, 1, 32, 32, 3) and batch['global'].dtype == np.uint8
    assert batch['local'].shape == (8, 2, 16, 16, 3)
    assert sorted(batch['label'].tolist()) == sorted([PICKED[0]] * 4 + [PICKED[1]] * 4)
    (evaluated,) = input_pipeline.eval_batches(split, global_batch=8, resize=32, crop=32)
    assert evaluated['image'].shape == (8, 32, 32, 3) and evaluated['mask'].all()
    assert evaluated['image'].std() > 0         # decoded pixels, not padding


def test_prompts_follow_the_reference_lists():
    reference = {c['wnid']: c for c in sources.load_reference('imagenet100.json')['classes']}
    for template, key in (('c_d', 'prompt_c_d'), ('c_h', 'prompt_c_h')):
        assert prompts.class_prompts('imagenet100', template, 'lemma') == [
            reference[w][key] for w in CLASSES]
    clip = prompts.class_prompts('imagenet100', 'c', 'clip')
    assert clip[CLASSES.index('n02869837')] == 'poke bonnet'
    assert prompts.class_prompts('pets', 'a {name} ({species})', 'torchvision')[0] == (
        'a Abyssinian (cat)')
    with pytest.raises(ValueError, match=r"\['definition'\]"):
        prompts.class_prompts('pets', 'c_d', 'clip')
    with pytest.raises(ValueError, match='neither a template name'):
        prompts.class_prompts('imagenet100', 'cd', 'lemma')
    with pytest.raises(ValueError, match='class_names for pets'):
        prompts.class_prompts('pets', 'c', 'lemma')
    assert prompts.select_classes('imagenet100', f'{CLASSES[9]}, 2') == [2, 9]
    with pytest.raises(ValueError, match="'n0000'"):
        prompts.select_classes('imagenet100', 'n0000')


def test_seeds_are_derived_from_class_index_and_attempt():
    request = generator.requests_for(CLASSES, CLASSES, 2, 7)[3]
    assert (request.class_index, request.index) == (1, 1)
    assert request.seed == generator.derive_seed(7, 1, 1) == request.seed_for(0)
    seeds = {request.seed_for(a) for a in range(5)}
    assert len(seeds) == 5 and all(0 <= s < 2 ** 31 for s in seeds)


def test_worker_from_env():
    assert cli.worker_from_env(None, None, {}) == (1, 0)
    assert cli.worker_from_env(None, None, {'SLURM_NTASKS': '4', 'SLURM_PROCID': '3'}) == (4, 3)
    assert cli.worker_from_env(None, None, {'WORLD_SIZE': '2', 'RANK': '1'}) == (2, 1)
    assert cli.worker_from_env(8, 5, {'WORLD_SIZE': '2', 'RANK': '1'}) == (8, 5)
    with pytest.raises(ValueError, match='worker_index'):
        cli.worker_from_env(2, 2, {})


@pytest.mark.parametrize('key, value, message', [
    ('width', 500, 'multiples of 8'),
    ('image_format', 'webp', 'image_format'),
    ('prompt', 'c_x', 'neither a template name'),
    ('classes', 'n01', "'n01'"),
    ('dtype', 'float8', 'dtype'),
    ('family', 'cifar', 'family'),
])
def test_bad_config_values_are_named(key, value, message):
    from sdtl_jax.datasets.generate import config as config_lib
    c = load_config('imagenet100_sd14')
    c[key] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c)
