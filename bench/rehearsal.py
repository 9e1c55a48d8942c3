r"""Full-size rehearsal: the paper's models, data shapes and SD 1.4's architecture, end to end.

  python -m bench.rehearsal --append          # full size: 20-30 minutes on a 2-core CPU
  python -m bench.rehearsal --tiny             # every stage at toy size: a code check

Stages, each a fresh process measured from outside (wall time, peak RSS of its process tree):
1. raw data shaped like the published downloads (`bench/rehearsal_data.py`): ImageNet-1k's
   tree with the 100 ImageNet-100 classes, a devkit-style flat val and the devkit tar; Pets'
   images.tar.gz and annotations.tar.gz;
2. both imported with the real importers (`sdtl_jax.datasets.imagenet100` and `.pets`);
3. per model (ResNet-50 on ImageNet-100, TinyViT-5M on Pets): the paper's baseline config at
   full size (1 x 224 + 8 x 96 crops, the real loader, evaluation at 224) with a reduced global
   batch and a few steps, SIGKILLed once its first checkpoint is written, resumed by the same
   command, then the N = 16 transfer (`configs/synth_to_real.py`) from that checkpoint
   (`transfer.init_from`; a baseline trained on real images stands in for the synthetic
   source: the transfer's mechanics are the same);
4. the generator on SD 1.4's full architecture with random weights
   (`sdtl_jax.datasets.generate.random_sd`), 2 images at 512 x 384 with a few steps, into shards.

Reported per stage: wall time, peak RSS, and what the stage is about: import images/s;
training step time (median after the first step, from metrics.jsonl), the compile time of each
program (JAX's own log, `jax_log_compiles`), checkpoint size on disk; generator images/s.
JAX's compilation cache lives in the rehearsal's folder, so the first stage of each model
compiles cold and the resumed run shows what the cache saves.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

from bench import rehearsal_data, results
from sdtl_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30
MODELS = {'resnet50': 'imagenet100', 'tinyvit_5m': 'pets'}
# Compiles slower than this are listed by name; the rest are summed (small jitted helpers).
LISTED_COMPILE_S = 0.5
_COMPILE_LINE = re.compile(r'Finished XLA compilation of (.+?) in ([0-9.]+) sec')

# Sizes: the paper's (full) or a toy run of the same stages (tiny).
SIZES = {
    'full': dict(scale=1.0, imagenet_train=3, imagenet_val=1, pets_trainval=2, pets_test=1,
                 global_batch=8, eval_batch=50, gen_width=512, gen_height=384, gen_steps=3),
    'tiny': dict(scale=0.12, imagenet_train=1, imagenet_val=1, pets_trainval=1, pets_test=1,
                 global_batch=4, eval_batch=50, gen_width=64, gen_height=48, gen_steps=2),
}
# The toy run's models and crops (the full run uses the paper's configs unchanged).
_TINY_CONFIG = '''# Written by bench.rehearsal --tiny: {config} with small models and crops.
import runpy

from sdtl_jax import config_lib


def get_config(arg=None):
    c = runpy.run_path({config!r})['get_config'](arg)
    c.model.update(config_lib.SMALL_MODELS[c.model.name])
    c.aug.global_size, c.aug.local_size = 32, 16
    c.eval.resize, c.eval.crop = 32, 32
    return c
'''


class Stage:
    """One process, measured: wall time, peak RSS of its process tree, output kept in a log."""

    def __init__(self, name: str, cmd: list[str], log_dir: str, env: dict[str, str]):
        self.name, self.cmd, self.env = name, cmd, env
        self.log = os.path.join(log_dir, re.sub(r'\W+', '_', name) + '.log')
        self.peak_rss = 0
        self.wall_s = 0.0
        self.returncode: int | None = None
        self.figures: dict[str, str] = {}

    def run(self, kill_when=None) -> 'Stage':
        """Runs to the end, or SIGKILLs the process group as soon as `kill_when()` is true."""
        print(f'[{self.name}] {" ".join(self.cmd[1:])}', flush=True)
        start = time.perf_counter()
        with open(self.log, 'w') as log:
            proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                    env=self.env, start_new_session=True)
            sampler = threading.Thread(target=self._sample_rss, args=(proc,), daemon=True)
            sampler.start()
            while proc.poll() is None:
                if kill_when is not None and kill_when():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.05)
            sampler.join()
        self.wall_s = time.perf_counter() - start
        self.returncode = proc.returncode
        return self

    def _sample_rss(self, proc: subprocess.Popen) -> None:
        """Peak of the summed RSS of the process and its children (loader workers)."""
        import psutil

        try:
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_rss = max(self.peak_rss, total)
                time.sleep(0.2)
        except psutil.Error:
            pass

    def output(self) -> str:
        with open(self.log, errors='replace') as f:
            return f.read()

    def check(self, expected_rc: int = 0) -> 'Stage':
        if self.returncode != expected_rc:
            tail = '\n'.join(self.output().splitlines()[-30:])
            raise RuntimeError(f'[{self.name}] exited with {self.returncode} (expected '
                               f'{expected_rc}); its log {self.log} ends:\n{tail}')
        return self

    def compiles(self) -> str:
        """The programs compiled, slowest first, from JAX's compile log."""
        times: dict[str, float] = {}
        for name, seconds in _COMPILE_LINE.findall(self.output()):
            times[name] = times.get(name, 0.0) + float(seconds)
        listed = sorted(((s, n) for n, s in times.items() if s >= LISTED_COMPILE_S), reverse=True)
        rest = sum(s for s in times.values() if s < LISTED_COMPILE_S)
        parts = [f'{n} {s:.1f} s' for s, n in listed]
        parts.append(f'{len(times) - len(listed)} others {rest:.1f} s')
        return ', '.join(parts)

    def line(self) -> str:
        figures = ''.join(f', {k} {v}' for k, v in self.figures.items())
        return (f'  {self.name:<24} {self.wall_s:7.1f} s, peak RSS '
                f'{self.peak_rss / GIB:5.2f} GiB{figures}')


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def _finished_steps(workdir: str) -> list[int]:
    """Checkpoint steps Orbax has finished (it renames a temporary folder at the end)."""
    directory = os.path.join(workdir, 'checkpoints')
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _train_figures(stage: Stage, workdir: str, records_before: int) -> None:
    """Step time, evaluation, compiles and checkpoint size of a training stage, from the
    evaluations it added to metrics.jsonl (a resumed run's file also holds the earlier ones)."""
    records = _metrics(workdir)[records_before:]
    step_s = [r['step_s'] for r in records if r.get('step_s')]
    if step_s:
        stage.figures['step'] = f'{sorted(step_s)[len(step_s) // 2]:.2f} s'
    if records:
        stage.figures['top-1'] = f'{records[-1]["top1"]:.1f}%'
    steps = _finished_steps(workdir)
    if steps:
        stage.figures['checkpoint'] = (
            f'{_du(os.path.join(workdir, "checkpoints", str(steps[-1]))) / 2**20:.0f} MiB')
    stage.figures['compiles'] = stage.compiles()


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string('root', None, 'Folder for the raw data, datasets, runs and logs '
                        '(default: a temporary folder, deleted at the end).',
                        flag_values=flag_values)
    flags.DEFINE_bool('tiny', False, 'Every stage at toy size (small models, 32 px crops, '
                      'small images, a tiny SD pipeline): checks the code, no figure to keep.',
                      flag_values=flag_values)
    flags.DEFINE_list('models', list(MODELS), 'Models to train: resnet50 (on ImageNet-100), '
                      'tinyvit_5m (on Pets).', flag_values=flag_values)
    flags.DEFINE_bool('generator', True, 'Run the SD 1.4 generator stage.',
                      flag_values=flag_values)
    flags.DEFINE_bool('append', False, 'Append the figures to bench/RESULTS.md.',
                      flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    unknown = sorted(set(flag_values.models) - set(MODELS))
    if unknown:
        raise app.UsageError(f'--models: unknown {unknown}; allowed: {list(MODELS)}')
    if flag_values.root:
        os.makedirs(flag_values.root, exist_ok=True)
        run(flag_values, flag_values.root)
    else:
        with tempfile.TemporaryDirectory(prefix='sdtl_rehearsal_') as root:
            run(flag_values, root)


def run(args: flags.FlagValues, root: str) -> list[str]:
    """Runs every stage in `root`; prints the figures, returns them, (--append) records them."""
    size = SIZES['tiny' if args.tiny else 'full']
    logs = os.path.join(root, 'logs')
    data_dir = os.path.join(root, 'data')
    os.makedirs(logs, exist_ok=True)
    env = {**os.environ, 'SDTL_DATA_DIR': data_dir, 'PYTHONUNBUFFERED': '1',
           'JAX_COMPILATION_CACHE_DIR': os.path.join(root, 'jax_cache'),
           'JAX_LOG_COMPILES': '1', 'HF_HUB_OFFLINE': '1'}
    python = sys.executable
    start = time.perf_counter()
    load_start = results.load_average()
    stages: list[Stage] = []

    def stage(name, cmd) -> Stage:
        s = Stage(name, [python, *cmd], logs, env)
        stages.append(s)
        return s

    # 1-2. Raw data, then the real importers.
    made = time.perf_counter()
    imagenet = rehearsal_data.make_imagenet(
        os.path.join(root, 'raw', 'imagenet'), train_per_class=size['imagenet_train'],
        val_per_class=size['imagenet_val'], scale=size['scale'])
    pets = rehearsal_data.make_pets(
        os.path.join(root, 'raw', 'pets'), trainval_per_class=size['pets_trainval'],
        test_per_class=size['pets_test'], scale=size['scale'])
    made = time.perf_counter() - made
    for name, module, source, extra in (
            ('import imagenet100', 'imagenet100', imagenet, [f'--devkit={imagenet["devkit"]}']),
            ('import pets', 'pets', pets, [])):
        dataset = f'{module}_real'
        out = os.path.join(data_dir, dataset)
        s = stage(name, ['-m', f'sdtl_jax.datasets.{module}', f'--src={source["src"]}', *extra,
                         f'--out={out}']).run().check()
        with open(os.path.join(out, 'meta.json')) as f:
            imported = sum(split['num_examples'] for split in json.load(f)['splits'].values())
        s.figures['images/s'] = f'{imported / s.wall_s:.1f} ({imported} images)'

    # 3. Per model: baseline (killed, resumed), then the N = 16 transfer.
    for model in args.models:
        data = MODELS[model]
        configs = {'baseline': os.path.join(REPO, 'configs', 'baseline.py'),
                   'transfer': os.path.join(REPO, 'configs', 'synth_to_real.py')}
        if args.tiny:
            for kind, path in configs.items():
                configs[kind] = os.path.join(root, f'tiny_{kind}.py')
                with open(configs[kind], 'w') as f:
                    f.write(_TINY_CONFIG.format(config=path))
        batch = size['global_batch']
        # 2 steps per epoch, 2 epochs (3 for the toy run, whose steps take milliseconds: the
        # kill must land before the run ends), every step timed.
        epochs = 3 if args.tiny else 2
        common = [f'--config.global_batch={batch}', f'--config.data.max_train_examples={2 * batch}',
                  f'--config.num_epochs={epochs}', '--config.warmup_epochs=1',
                  '--config.eval.last_epochs=1', f'--config.eval.global_batch={size["eval_batch"]}',
                  '--config.log_every_steps=1']
        base_dir = os.path.join(root, 'runs', f'{model}_baseline')
        baseline = ['-m', 'sdtl_jax.main', f'--config={configs["baseline"]}:data={data}',
                    f'--workdir={base_dir}', *common]
        killed = stage(f'{model} baseline', baseline).run(
            kill_when=lambda: bool(_finished_steps(base_dir)))
        if killed.returncode != -signal.SIGKILL:
            raise RuntimeError(f'[{killed.name}] ended ({killed.returncode}) before its first '
                               f'checkpoint could be killed; see {killed.log}')
        killed.figures['killed after checkpoint'] = str(_finished_steps(base_dir)[-1])
        _train_figures(killed, base_dir, 0)
        records_before = len(_metrics(base_dir))
        resumed = stage(f'{model} resume', baseline).run().check()
        if 'Resumed' not in resumed.output():
            raise RuntimeError(f'[{resumed.name}] did not resume from the checkpoint; see '
                               f'{resumed.log}')
        _train_figures(resumed, base_dir, records_before)
        transfer_dir = os.path.join(root, 'runs', f'{model}_transfer16')
        transfer = stage(f'{model} transfer N=16', [
            '-m', 'sdtl_jax.main', f'--config={configs["transfer"]}:data={data},num_frozen=16',
            f'--workdir={transfer_dir}', f'--config.transfer.init_from={base_dir}',
            *common]).run().check()
        _train_figures(transfer, transfer_dir, 0)

    # 4. The generator on SD 1.4's architecture (random weights), 2 images.
    if args.generator:
        pipeline = os.path.join(root, 'sd14_random')
        builder = (['-m', 'sdtl_jax.datasets.generate.tiny', f'--out={pipeline}'] if args.tiny else
                   ['-m', 'sdtl_jax.datasets.generate.random_sd', f'--out={pipeline}'])
        built = stage('tiny random SD' if args.tiny else 'SD 1.4 random weights',
                      builder).run().check()
        built.figures['on disk'] = f'{_du(pipeline) / GIB:.2f} GiB'
        gen = stage('generate 2 images', [
            '-m', 'sdtl_jax.datasets.generate',
            f'--config={os.path.join(REPO, "configs", "generate", "imagenet100_sd14.py")}',
            f'--outdir={os.path.join(data_dir, "imagenet100_synth")}',
            f'--config.model={pipeline}', '--config.local_files_only=True',
            '--config.classes=0,1', '--config.images_per_class=1', '--config.batch_size=2',
            f'--config.steps={size["gen_steps"]}', f'--config.width={size["gen_width"]}',
            f'--config.height={size["gen_height"]}']).run().check()
        gen.figures['images/s'] = f'{2 / gen.wall_s:.3f} (2 images, {size["gen_steps"]} steps, '\
                                  f'{size["gen_width"]} x {size["gen_height"]}, load included)'

    wall = time.perf_counter() - start
    lines = [f'rehearsal ({"tiny" if args.tiny else "full size"}): {os.cpu_count()} CPU cores, '
             f'{platform.machine()}, Python {platform.python_version()}',
             f'load average at start: {load_start}',
             f'  {"raw data":<24} {made:7.1f} s ({imagenet["images"]} ImageNet-shaped and '
             f'{pets["images"]} Pets-shaped JPEGs)',
             *(s.line() for s in stages),
             f'load average at end: {results.load_average()}; wall time {wall / 60:.1f} min']
    print('\n'.join(lines))
    if args.append:
        results.append('rehearsal', lines, args)
    return lines


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
