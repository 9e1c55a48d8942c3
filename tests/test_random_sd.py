"""SD 1.4's architecture with random weights (sdtl_jax.datasets.generate.random_sd).

At full size, on a busy 2-core CPU, building and saving it took 40 s, loading it 10 s and two
64 x 64 images at 2 steps 70 s: too slow for the suite. So the full-size models are
built on the meta device (shapes only, instant) to check the published configs by their
parameter counts, and the same code writes, loads and generates at tiny widths.
"""
import json

import pytest

pytest.importorskip('diffusers')
torch = pytest.importorskip('torch')

from absl import flags  # noqa: E402

from sdtl_jax import cli  # noqa: E402
from sdtl_jax.datasets.generate import diffusion, random_sd  # noqa: E402

# The published SD 1.4 models' sizes (UNet 859.5 M, VAE 83.7 M, CLIP ViT-L/14 text 123.1 M,
# safety checker: CLIP ViT-L/14 vision 303.2 M + projection and concept embeddings).
PARAMETERS = {'unet': 859_520_964, 'vae': 83_653_863, 'text_encoder': 123_060_480,
              'safety_checker': 303_981_588}


def test_full_size_models_have_sd14s_parameter_counts():
    pipe = random_sd.build_sd14(device='meta')
    without = random_sd.build_sd14(safety_checker=False, device='meta')
    assert random_sd.parameter_counts(pipe) == PARAMETERS
    assert pipe.safety_checker.vision_model.config.patch_size == 14
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 512
    assert type(pipe.scheduler).__name__ == 'PNDMScheduler'
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.skip_prk_steps
    assert len(pipe.tokenizer) < pipe.text_encoder.config.vocab_size
    assert without.safety_checker is None and without.feature_extractor is None
    assert random_sd.parameter_counts(without) == {k: v for k, v in PARAMETERS.items()
                                                   if k != 'safety_checker'}


@pytest.fixture
def tiny_widths(monkeypatch):
    """The configs at tiny widths: the same builder, layout and pipeline, built in a second."""
    monkeypatch.setattr(random_sd, 'UNET', {
        **random_sd.UNET, 'block_out_channels': [8, 16, 16, 16], 'norm_num_groups': 4,
        'cross_attention_dim': 32})
    monkeypatch.setattr(random_sd, 'VAE', {
        **random_sd.VAE, 'block_out_channels': [8, 16, 16, 16], 'norm_num_groups': 4})
    monkeypatch.setattr(random_sd, 'TEXT_ENCODER', {
        **random_sd.TEXT_ENCODER, 'hidden_size': 32, 'intermediate_size': 37,
        'num_attention_heads': 4, 'num_hidden_layers': 2, 'projection_dim': 32})
    monkeypatch.setattr(random_sd, 'SAFETY_CHECKER', {'projection_dim': 32, 'vision_config': {
        **random_sd.SAFETY_CHECKER['vision_config'], 'hidden_size': 32,
        'intermediate_size': 37, 'num_attention_heads': 4, 'num_hidden_layers': 1}})


def test_written_pipeline_loads_and_generates(tiny_widths, tmp_path):
    path = tmp_path / 'sd14'
    cli.call(random_sd, [f'--out={path}'])
    index = json.loads((path / 'model_index.json').read_text())
    assert index['_class_name'] == 'StableDiffusionPipeline'
    assert index['safety_checker'] == ['stable_diffusion', 'StableDiffusionSafetyChecker']
    from safetensors import safe_open
    with safe_open(path / 'unet' / 'diffusion_pytorch_model.safetensors', 'pt') as f:
        assert f.get_tensor('conv_in.weight').dtype == torch.float16   # as a GPU runs it

    pipe, info = diffusion.load_pipeline(str(path), device='cpu')
    assert info['safety_checker'] and info['dtype'] == 'float32'
    gen = diffusion.DiffusionGenerator(pipe, info, steps=2, width=64, height=48)
    images, flagged = gen.run(['a photo of a tench', 'a goldfish, in the water'], [0, 1])
    assert images.shape == (2, 48, 64, 3) and images.std() > 0
    assert flagged == [False, False]   # the random checker's concept thresholds flag nothing


def test_same_seed_same_weights_and_bad_dtype_is_named(tiny_widths):
    first, second, other = (random_sd.build_sd14(seed=s, safety_checker=False)
                            for s in (0, 0, 1))
    weight = [p.unet.conv_in.weight for p in (first, second, other)]
    assert torch.equal(weight[0], weight[1]) and not torch.equal(weight[0], weight[2])
    with pytest.raises(ValueError, match='float16'):
        random_sd.build_sd14(dtype='half')


def test_generator_benchmark_times_it(tiny_widths):
    from bench import generator_speed
    lines = generator_speed.run(cli.parse(generator_speed, [
        '--random_sd14', '--width=64', '--height=48', '--steps=1', '--images=2',
        '--naive_images=1', '--batch_size=2']))
    assert lines[0].startswith("SD 1.4's architecture with random weights, 64 x 48, 1 steps")
    assert float(lines[2].split(':')[1].split()[0]) > 0     # ours, images/s
    with pytest.raises(flags.IllegalFlagValueError, match='tiny'):
        cli.parse(generator_speed, ['--random_sd14', '--tiny'])
