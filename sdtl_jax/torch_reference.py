"""The PyTorch reference implementations (torchvision ResNet-50, timm TinyViT-5M).

Used by the fidelity-fixture script and the benchmark's PyTorch reference step; never by
training. Install them with `SDTL_EXTRAS=reference bash scripts/setup.sh` (torchvision 0.28.0,
the release built for torch 2.13.0, and timm).

PyPI only has CUDA builds of torchvision. With the CPU build of torch, its compiled operators
(nms, roi_align, ...) do not load, and `import torchvision` fails in `_meta_registrations`,
which registers shapes for those operators. The models need none of them, so `_torchvision`
skips that one module. The import works unchanged where torchvision matches its torch (GPU hosts).
transformers and diffusers import torchvision without this workaround, so on a CPU-torch host
keep the reference packages in a venv of their own (tests/test_generate.py fails beside them).
"""

from __future__ import annotations

import sys
import types

_INSTALL = ('pip install torchvision==0.28.0 timm (or SDTL_EXTRAS=reference bash '
            'scripts/setup.sh)')


def _torchvision():
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ImportError(f'The PyTorch reference needs torch: {_INSTALL}') from e
    if 'torchvision' not in sys.modules:
        try:
            import torchvision
        except RuntimeError:  # a CUDA torchvision beside a CPU torch (module docstring)
            for name in [n for n in sys.modules if n.startswith('torchvision')]:
                del sys.modules[name]
            sys.modules['torchvision._meta_registrations'] = types.ModuleType(
                'torchvision._meta_registrations')
        except ImportError as e:
            raise ImportError(f'The PyTorch reference needs torchvision: {_INSTALL}') from e
    import torchvision
    return torchvision


def resnet50(**kwargs):
    """torchvision's `resnet50(weights=None, **kwargs)`, e.g. `num_classes=100`."""
    return _torchvision().models.resnet50(weights=None, **kwargs)


def tinyvit_5m(**kwargs):
    """timm's TinyViT-5M (`tiny_vit_5m_224`, random weights), e.g. `num_classes=37`."""
    _torchvision()  # timm imports torchvision
    try:
        import timm
    except ImportError as e:
        raise ImportError(f'The PyTorch reference needs timm: {_INSTALL}') from e
    return timm.create_model('tiny_vit_5m_224', pretrained=False, **kwargs)
