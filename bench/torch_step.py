"""The PyTorch reference of our train step, for `bench/train_step_speed.py`'s ours / PyTorch.

The same step as `train.train_step`, written as a PyTorch user would: torchvision's ResNet-50 or
timm's TinyViT-5M (through `sdtl_jax.torch_reference`) with its classifier replaced by the
cosine head of docs/paper.md §3; SGD with momentum 0.9 and weight decay 1e-4 on >1-D weights
only (docs/paper.md §4); two forward passes, the global crops then the local crops, and one
backward pass of the mean cross-entropy over every crop (docs/paper.md §5). The first N of the
18 layers are frozen as ours are: `requires_grad=False` (so autograd runs no backward pass
through them and the optimizer never sees them) and eval mode (BatchNorm on running statistics).

Given every chance to be fast: `cudnn.benchmark`, bf16 autocast on a GPU when our step computes
in bf16, channels_last for the convolutional ResNet, the fused SGD on CUDA. Its batch arrives
normalised, on the device: PyTorch's loader does the light ops and normalisation on the host.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench import step_common
from sdtl_jax import config_lib, layer_trees, torch_reference
from sdtl_jax.data.augment import normalize
from sdtl_jax.models import layers


class CosineHead(nn.Module):
    """`layers.CosineClassifier` in PyTorch: bias-free, features and class weights L2-normalised,
    divided by tau, in float32; normal init (std 0.01), never zeros."""

    def __init__(self, in_features: int, num_classes: int, tau: float = 0.1):
        super().__init__()
        self.tau = tau
        self.weight = nn.Parameter(torch.randn(in_features, num_classes) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0) / self.tau


def build_model(spec: step_common.StepSpec) -> tuple[nn.Module, list[list[nn.Module]]]:
    """The reference model with the cosine head, and its 18 layers (docs/paper.md §2) in
    forward order, each a list of modules, as ours are named."""
    if not step_common.reference_matches(spec):
        raise ValueError(f'No PyTorch reference for {spec.model} with {spec.model_kwargs}')
    if spec.model == 'resnet50':
        model = torch_reference.resnet50(num_classes=spec.num_classes)
        model.fc = CosineHead(model.fc.in_features, spec.num_classes)
        blocks = [[b] for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
                  for b in stage]
        named = [[model.conv1, model.bn1], *blocks, [model.fc]]   # stem ... head
    else:
        model = torch_reference.tinyvit_5m(num_classes=spec.num_classes, **spec.model_kwargs)
        model.head.fc = CosineHead(model.head.fc.in_features, spec.num_classes)
        named = [[model.patch_embed]]
        for stage in model.stages:
            downsample = getattr(stage, 'downsample', None)   # stage 0 has none
            if downsample is not None and not isinstance(downsample, nn.Identity):
                named.append([downsample])
            named += [[b] for b in stage.blocks]
        named += [[model.head.norm], [model.head.fc]]   # ours: 'norm' (pool + LN), 'head'
    if len(named) != layers.NUM_LAYERS:
        raise ValueError(f'{spec.model}: {len(named)} layers, expected {layers.NUM_LAYERS}')
    return model, named


def build(spec: step_common.StepSpec, device: torch.device | None = None):
    """The reference step for `spec`: returns (step, model, its 18 layers, batch on device).

    `step()` runs one SGD step and returns the loss (a tensor, not synchronised).
    """
    device = device or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model, named = build_model(spec)
    frozen_modules = [m for group in named[:spec.num_frozen] for m in group]
    frozen = {id(p) for m in frozen_modules for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    memory_format = (torch.channels_last if spec.model == 'resnet50'
                     else torch.contiguous_format)
    model = model.to(device=device, memory_format=memory_format)
    model.train()
    for m in frozen_modules:
        m.eval()   # frozen BatchNorm: running statistics, no update (frozen_bn='inference')

    config = step_common.recipe(spec)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            no = p.ndim <= 1 or any(n in name for n in layer_trees.NO_DECAY_NAMES)
            (no_decay if no else decay).append(p)
    optimizer = torch.optim.SGD(
        [{'params': decay, 'weight_decay': config.optim.weight_decay},
         {'params': no_decay, 'weight_decay': 0.0}],
        lr=config_lib.learning_rate(config), momentum=config.optim.momentum,
        nesterov=False, fused=device.type == 'cuda' or None)

    bf16 = step_common.resolve_dtype(spec, _platform(device)) == 'bfloat16'
    crops, labels = _device_batch(spec, device, memory_format)

    def step() -> torch.Tensor:
        loss_sum = 0.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for images, target in zip(crops, labels):   # global crops, then local crops
                loss_sum = loss_sum + F.cross_entropy(model(images).float(), target,
                                                      reduction='sum')
        loss = loss_sum / spec.num_crops
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, model, named, (crops, labels)


def _device_batch(spec, device, memory_format):
    """`step_common.synthetic_batch`'s crops as the PyTorch loader hands them over: normalised
    float32 NCHW per pass, crops of an image adjacent, each crop with its image's label."""
    batch = step_common.synthetic_batch(spec)
    mean = torch.tensor(normalize.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(normalize.IMAGENET_STD).view(1, 3, 1, 1)
    crops, labels = [], []
    for key in ('global', 'local'):
        if key not in batch:
            continue
        images = torch.from_numpy(batch[key]).flatten(0, 1).permute(0, 3, 1, 2).float()
        images = ((images / 255.0 - mean) / std).to(device, memory_format=memory_format)
        crops.append(images)
        labels.append(torch.from_numpy(batch['label']).long().repeat_interleave(
            batch[key].shape[1]).to(device))
    return crops, labels


def _platform(device: torch.device) -> str:
    return 'gpu' if device.type == 'cuda' else 'cpu'


def measure(spec: step_common.StepSpec) -> dict[str, Any]:
    """Times the reference step in this process; the same fields as `train_step_speed.measure`."""
    step, model, _, _ = build(spec)
    return time_step(spec, step, next(model.parameters()).device)


def time_step(spec: step_common.StepSpec, step, device: torch.device) -> dict[str, Any]:
    """`measure` on a step from `build`."""
    cuda = device.type == 'cuda'
    loss = None

    def run():
        nonlocal loss
        loss = step()

    timing = step_common.time_steps(run, lambda _: cuda and torch.cuda.synchronize(),
                                    warmup=spec.warmup, repeats=spec.repeats)
    return {**timing, 'samples_per_s': spec.batch / timing['step_s'],
            'peak_bytes': torch.cuda.max_memory_allocated() if cuda
            else step_common.max_rss_bytes(),
            'memory': 'device peak' if cuda else 'max RSS',
            'device': torch.cuda.get_device_name(device) if cuda else 'cpu',
            'dtype': step_common.resolve_dtype(spec, _platform(device)),
            'loss': float(loss)}
