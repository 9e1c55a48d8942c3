"""sdtl_jax: synthetic-to-real transfer learning for vision in JAX/Flax.

Lower bounds here; `requirements-lock.txt` pins the versions CI installs, as big_vision does, and
`scripts/setup.sh` installs them with the machine's torch build (CPU, CUDA or none). Python >= 3.11:
the lock's jax, numpy, scipy, flax, orbax and grain require it.
"""
import setuptools

CORE = [
    'absl-py>=2.1',
    'array-record>=0.8',
    'flax>=0.12',
    'grain>=0.2.18',
    'jax>=0.10',
    'matplotlib>=3.8',        # its bundled fonts render the demo's synthetic digits
    'ml-collections>=1.0',
    'msgpack>=1.0',
    'numpy>=2.0',
    'opencv-python-headless>=4.10',   # decode + crop path of the loader (bench/RESULTS.md)
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12',
    'pillow>=10.0',
    'scikit-learn>=1.4',      # its bundled digits are the demo's real data
    'scipy>=1.10',            # reads the ImageNet devkit's meta.mat (import_imagenet100)
    'tensorboardX>=2.6',
    'tqdm>=4.66',
]
GENERATE = ['torch>=2.13', 'diffusers>=0.42', 'transformers>=5.0', 'accelerate>=1.0']
# import_tfds reads TFDS datasets prepared as array_record; no TensorFlow needed.
TFDS = ['tensorflow-datasets>=4.9.9', 'importlib_resources>=6.0']
# gs:// workdirs (sdtl_jax/fileio.py); Orbax and tensorboardX bring their own GCS clients.
GCS = ['gcsfs>=2024.6']
# The viewer only (`tensorboard --logdir=<workdir>`): runs write their events with tensorboardX.
TENSORBOARD = ['tensorboard>=2.16']
# tests/test_gcs.py runs a gs:// workdir against a local GCS emulator.
TEST = ['pytest>=8.0', 'pytest-xdist>=3.5', 'ruff>=0.6', 'gcp-storage-emulator>=2026.7', *GCS,
        'nbclient>=0.10', 'ipykernel>=6.29']   # tests/test_notebooks.py: notebooks in a kernel
# The PyTorch reference models (sdtl_jax/torch_reference.py): fidelity fixtures and the
# benchmark's reference step only; tests read committed fixtures instead. torchvision must be the
# build of the installed torch: PyPI's is a CUDA build whose operators do not load beside CPU torch
# (breaking transformers' and diffusers' imports). scripts/setup.sh takes it from PyTorch's index.
REFERENCE = ['torch>=2.13', 'torchvision==0.28.0', 'timm>=1.0']

setuptools.setup(
    name='sdtl_jax',
    version='0.1.0',
    description='Synthetic-to-real transfer learning for vision (Hennicke et al., 2024)',
    license='Apache-2.0',
    packages=setuptools.find_packages(include=['sdtl_jax', 'sdtl_jax.*']),
    package_data={'sdtl_jax': ['reference/*.json']},
    python_requires='>=3.11',
    install_requires=CORE,
    extras_require={
        'generate': GENERATE,
        'test': TEST,
        'reference': REFERENCE,
        'tfds': TFDS,
        'gcs': GCS,
        'tensorboard': TENSORBOARD,
        'tpu': ['jax[tpu]>=0.10', *GCS],
        'gpu': ['jax[cuda13]>=0.10'],   # NVIDIA driver >= 580; jax[cuda12] for older ones
    },
)
