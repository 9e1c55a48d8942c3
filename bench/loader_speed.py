r"""Training-loader throughput: decode + DINO multi-crop (1 x 224 + 8 x 96) per CPU core.

Goal (issue 3): at least 300 samples/s per CPU core on JPEGs of ImageNet size (~400 x 350,
quality 90), with the worker and thread counts the config uses by default (`data.num_workers`,
`data.num_threads`). The light ops (jitter, blur, solarize...) run in the train step on the
accelerator (`photometric.py`); `--device_ops` also times them on this machine's JAX device.

  python -m bench.loader_speed                       # the config's defaults, 5 repeats
  python -m bench.loader_speed --settings=0:1,0:2,0:16,2:1,2:2 --device_ops --append

The images are real photos (the two that scikit-learn ships), cut and resized at random to
380-430 x 330-370 px and stored as an ArrayRecord dataset in a temporary directory; `--data`
reads a dataset directory of your own instead. One sample is one image with all its crops.
Prints the median over repeats of samples/s, per core and in all; `--append` adds them to
bench/RESULTS.md. `--large_jpeg` also times one 10,000 x 10,000 JPEG (goal: under 1 s a visit;
the loader decodes it at reduced scale, `records.reduction_factor`).
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from bench import results
from sdtl_jax import cli, config_lib
from sdtl_jax.data import input_pipeline, layout, records, sources
from sdtl_jax.data.augment import eval_view
from sdtl_jax.datasets import shards


def make_jpeg_dataset(out: str, num_images: int, seed: int = 0) -> sources.DatasetSplit:
    """ImageNet-size JPEGs (quality 90) cut from scikit-learn's sample photos, as shards."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    with shards.ShardWriter(out, 'train', num_classes=10) as writer:
        for i in range(num_images):
            photo = photos[i % len(photos)]
            w, h = int(rng.integers(380, 431)), int(rng.integers(330, 371))
            zoom = rng.uniform(0.6, 1.0)
            left = rng.uniform(0, photo.width - w * zoom)
            top = rng.uniform(0, photo.height - h * zoom)
            image = photo.resize((w, h), Image.Resampling.BILINEAR,
                                 box=(left, top, left + w * zoom, top + h * zoom))
            buf = io.BytesIO()
            image.save(buf, format='JPEG', quality=90)
            writer.write(buf.getvalue(), i % 10, f'photo{i:05d}')
        info = writer.close()
    layout.write_meta(out, 'bench_jpegs', 'real', [str(c) for c in range(10)], {'train': info})
    return sources.split_from_dir(out, 'train')


def samples_per_second(split: sources.DatasetSplit, *, aug, num_workers: int,
                       num_threads: int, batch: int, num_batches: int,
                       repeats: int) -> list[float]:
    """samples/s of the training pipeline, one figure per repeat (after warm-up batches)."""
    iterator = iter(input_pipeline.train_dataset(split, global_batch=batch, seed=0, aug=aug,
                                                 num_workers=num_workers,
                                                 num_threads=num_threads))
    # Warm-up: workers start, shards open, and the batches prefetched meanwhile are drained,
    # so that the timed batches are made while we wait.
    for _ in range((num_threads + 3) * max(input_pipeline.resolve_num_workers(num_workers), 1)):
        next(iterator)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(num_batches):
            next(iterator)
        rates.append(num_batches * batch / (time.perf_counter() - start))
    iterator.close()
    return rates


def device_ops_line(split: sources.DatasetSplit, aug, batch: int) -> str:
    """Median time of the light ops of one batch (all crops) on the default JAX device."""
    import jax

    from sdtl_jax.data.augment import photometric

    first = next(iter(input_pipeline.train_dataset(split, global_batch=batch, seed=0, aug=aug)))
    fn = jax.jit(lambda b: [photometric.apply(
        b[k].reshape((-1,) + b[k].shape[2:]), b[f'{k}_ops'].reshape(-1, photometric.NUM_OPS))
        for k in ('global', 'local')])
    device_batch = jax.device_put(first)
    jax.block_until_ready(fn(device_batch))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(fn(device_batch))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return (f'  light ops on {jax.devices()[0].device_kind}: {seconds * 1e3:.0f} ms per batch '
            f'of {batch} ({batch / seconds:.0f} samples/s)')


def large_jpeg_line(side: int = 10_000, visits: int = 3) -> str:
    """Median seconds of a multi-crop visit and of an evaluation visit of one side x side JPEG
    (smooth colours, quality 90), in this process."""
    import cv2

    from sdtl_jax.data.augment import pipelines

    small = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    image = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)
    ok, encoded = cv2.imencode('.jpg', image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    del image
    record = records.encode_record(encoded.tobytes(), 0, 'large')
    # The recipe's crops (config_lib's aug section, as training builds them), at full size.
    multicrop = pipelines.build(config_lib.base(data='imagenet100').aug)
    evaluation = eval_view.EvalTransform()

    def seconds(fn) -> float:
        times = []
        for i in range(visits):
            start = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    crop_s = seconds(lambda i: multicrop.random_map(record, np.random.default_rng(i)))
    eval_s = seconds(lambda i: evaluation.map(record))
    return (f'  one {side:,} x {side:,} JPEG ({len(encoded) / 2**20:.1f} MB): {crop_s:.2f} s '
            f'per multi-crop visit, {eval_s:.2f} s per evaluation visit (median of {visits})')


def _setting(text: str) -> bool:
    workers, sep, threads = text.partition(':')
    return bool(sep) and workers.lstrip('-').isdigit() and threads.isdigit()


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    data = config_lib.base(data='imagenet100').data
    default = f'{data.num_workers}:{data.num_threads}'
    flags.DEFINE_list('settings', [default], 'workers:threads pairs (workers -1 = one per '
                      f'core); the config default is {default}.', flag_values=flag_values)
    flags.DEFINE_bool('device_ops', False, 'Also time the light ops of a batch on the JAX '
                      'device.', flag_values=flag_values)
    flags.DEFINE_bool('large_jpeg', False, 'Also time a visit of one 10,000 x 10,000 JPEG.',
                      flag_values=flag_values)
    flags.DEFINE_string('data', '', 'A dataset directory (default: the photos).',
                        flag_values=flag_values)
    flags.DEFINE_integer('num_images', 512, 'Photos made.', lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer('batch', 64, 'Batch size.', lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer('num_batches', 8, 'Batches timed per repeat.', lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer('repeats', 5, 'Repeats; the median is reported.', lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_bool('append', False, 'Append to bench/RESULTS.md.', flag_values=flag_values)
    flags.register_validator('settings', lambda v: all(map(_setting, v)),
                             'expected workers:threads pairs such as 0:16,2:2',
                             flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    run(flag_values)


def run(args: flags.FlagValues) -> list[str]:
    """Measures every setting; prints the lines, returns them and (--append) records them."""
    aug = config_lib.base(data='imagenet100').aug      # the paper's multi-crop, 224 + 8 x 96
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        split = (sources.split_from_dir(args.data, 'train') if args.data
                 else make_jpeg_dataset(tmp, args.num_images))
        lines = [f'decode + multi-crop {aug.num_global} x {aug.global_size} + {aug.num_local} x '
                 f'{aug.local_size}, batch {args.batch}, {args.repeats} x {args.num_batches} '
                 f'batches, {cores} CPU cores, {platform.machine()}'
                 f'{_versions()}']
        for setting in args.settings:
            workers, threads = (int(x) for x in setting.split(':'))
            rates = samples_per_second(split, aug=aug, num_workers=workers, num_threads=threads,
                                       batch=args.batch, num_batches=args.num_batches,
                                       repeats=args.repeats)
            median = statistics.median(rates)
            shown = input_pipeline.resolve_num_workers(workers)
            lines.append(f'  {shown} workers x {threads:2d} threads: {median / cores:5.0f} '
                         f'samples/s per core (median; {median:.0f} in all; repeats '
                         f'{min(rates):.0f}-{max(rates):.0f})')
            print(lines[-1], flush=True)
        if args.device_ops:
            lines.append(device_ops_line(split, aug, args.batch))
            print(lines[-1], flush=True)
        if args.large_jpeg:
            lines.append(large_jpeg_line())
            print(lines[-1], flush=True)
    print(lines[0])
    if args.append:
        results.append('loader_speed', lines, args)
    return lines


def _versions() -> str:
    from importlib import metadata

    import cv2
    return (f', opencv {cv2.__version__}, pillow {Image.__version__}, '
            f'grain {metadata.version("grain")}')


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)   # grain's workers need the flags parsed
