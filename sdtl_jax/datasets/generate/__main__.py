r"""Generates a synthetic dataset into ArrayRecord shards:

  python -m sdtl_jax.datasets.generate --config=configs/generate/imagenet100_sd14.py --outdir=DIR

`--config.key=value` overrides any value (the config is locked: a misspelt key is an error).
Re-running the same command resumes: finished shards are kept, the rest is generated. Several
processes split the shards between them (one per GPU: launch/generate_multi_gpu.sh; several
hosts: launch/generate_slurm.sh): `--num_workers=W --worker_index=w`, or the launcher's rank
variables (SLURM_NTASKS/SLURM_PROCID, WORLD_SIZE/RANK). The last worker to finish writes the
sidecar (meta.json, labels, summary); `--merge` does only that.

Exit codes: 0 done (this worker's part, or all), 2 bad config or input, 3 weights not found.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sdtl_jax import cli

flags.DEFINE_string('outdir', None, 'The dataset directory, e.g. $SDTL_DATA_DIR/imagenet100_synth.',
                    required=True)
config_flags.DEFINE_config_file('config', None, 'Generation config file.', lock_config=True)
flags.DEFINE_integer('num_workers', None, 'Processes sharing the work (default: from '
                     'SLURM_NTASKS or WORLD_SIZE, else 1).')
flags.DEFINE_integer('worker_index', None, 'This process, in [0, num_workers) (default: '
                     'SLURM_PROCID or RANK, else 0).')
flags.DEFINE_bool('merge', False, 'Only write the sidecar of a split whose shards are all done.')
flags.DEFINE_bool('overwrite', False, 'Delete an earlier generation of the split with other '
                  'settings first.')
FLAGS = flags.FLAGS

# Rank variables of common launchers, tried in order: (count, index).
RANK_VARIABLES = (('SDTL_NUM_WORKERS', 'SDTL_WORKER_INDEX'), ('SLURM_NTASKS', 'SLURM_PROCID'),
                  ('WORLD_SIZE', 'RANK'))


def worker_from_env(num_workers: int | None, worker_index: int | None,
                    environ=os.environ) -> tuple[int, int]:
    """(num_workers, worker_index) from the flags, else the launcher's environment, else (1, 0)."""
    if num_workers is None and worker_index is None:
        for count, index in RANK_VARIABLES:
            if count in environ and index in environ:
                num_workers, worker_index = int(environ[count]), int(environ[index])
                break
    num_workers = 1 if num_workers is None else num_workers
    worker_index = 0 if worker_index is None else worker_index
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise ValueError(f'need num_workers >= 1 and 0 <= worker_index < num_workers, got '
                         f'{num_workers} and {worker_index}')
    return num_workers, worker_index


def run(config, outdir: str, *, num_workers: int = 1, worker_index: int = 0,
        overwrite: bool = False) -> dict | None:
    """Generates this worker's part of `config`'s split into `outdir`; the summary when all done."""
    from sdtl_jax.data import sources
    from sdtl_jax.datasets.generate import config as config_lib
    from sdtl_jax.datasets.generate import diffusion, prompts
    from sdtl_jax.datasets.generate import generator as generator_lib

    config_lib.validate(config)
    classes = sources.class_list(config.family)
    requests = generator_lib.requests_for(
        classes, prompts.class_prompts(config.family, config.prompt, config.class_names),
        config.images_per_class, config.seed,
        class_indices=prompts.select_classes(config.family, config.classes))
    pipe, info = diffusion.load_pipeline(
        config.model, revision=config.revision, local_files_only=config.local_files_only,
        dtype=config.dtype, device=config.device, safety_checker=config.safety_checker,
        scheduler=config.scheduler)
    speed = diffusion.optimize(pipe, attention=config.attention,
                               channels_last=config.channels_last, compile_mode=config.compile,
                               vae_slicing=config.vae_slicing)
    gen = diffusion.DiffusionGenerator(
        pipe, info, steps=config.steps, guidance=config.guidance, width=config.width,
        height=config.height, negative_prompt=config.negative_prompt,
        max_resamples=config.max_resamples, speed=speed)
    print(f'{info["pipeline"]} {config.model} on {info["device_name"]} ({info["dtype"]}): '
          f'{len(requests):,} images, worker {worker_index} of {num_workers}', flush=True)
    return generator_lib.write_generated_split(
        gen, requests, out_dir=outdir, name=config.name, classes=classes, split=config.split,
        settings={**gen.settings(), 'seed': config.seed, 'images_per_class':
                  config.images_per_class}, versions=diffusion.library_versions(),
        requests_per_shard=config.records_per_shard, batch_size=config.batch_size,
        image_format=config.image_format, jpeg_quality=config.jpeg_quality,
        num_workers=num_workers, worker_index=worker_index,
        encode_threads=config.encode_threads, overwrite=overwrite)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)
    from sdtl_jax.datasets.generate import diffusion
    from sdtl_jax.datasets.generate import generator as generator_lib

    try:
        if FLAGS.merge:
            generator_lib.merge(FLAGS.outdir, FLAGS.config.split)
            return 0
        num_workers, worker_index = worker_from_env(FLAGS.num_workers, FLAGS.worker_index)
        run(FLAGS.config, FLAGS.outdir, num_workers=num_workers, worker_index=worker_index,
            overwrite=FLAGS.overwrite)
    except diffusion.ModelNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
