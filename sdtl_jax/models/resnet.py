"""ResNet-50 v1.5 (He et al., 2016, "Deep Residual Learning"; torchvision's variant).

v1.5: the stride of a down-sampling bottleneck sits on its 3x3 convolution. As in torchvision,
the last BatchNorm of a block starts at scale 1 (no zero-init residual) and the convolutions
use Kaiming normal init (fan_out, ReLU gain). Padding is explicit and symmetric, as PyTorch's,
so converted torchvision weights give the same outputs.

Layers (docs/paper.md §2), in forward order: `stem` (7x7/2 conv, BN, ReLU, 3x3/2 max-pool),
`block00` .. `block15` (bottlenecks, stages of 3, 4, 6, 3), `head` (global average pool and
the cosine classifier). Sub-module names follow torchvision's (`conv1`, `bn1`, ..., with
`downsample.0/1` as `downsample_conv/downsample_bn`) so a weight converter maps them by name.

BatchNorm has no `axis_name`: under `jit` with a sharded batch the statistics are global.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdtl_jax.models import layers

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'); 'normal' is untruncated.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features: int, kernel_size: int, strides: int, dtype: Any, name: str) -> nn.Module:
    """Bias-free convolution with PyTorch's symmetric `padding=k // 2`."""
    if kernel_size == 1:
        return layers.PointwiseConv(features, strides, conv_init, dtype, name=name)
    return layers.Conv(features, kernel_size, strides, conv_init, dtype, name=name)


class Stem(nn.Module):
    """7x7/2 convolution (pad 3), BatchNorm, ReLU, 3x3/2 max-pool (pad 1 with -inf)."""
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = conv(self.width, 7, 2, self.dtype, 'conv1')(x)
        x = nn.relu(layers.batch_norm(train=train, dtype=self.dtype, name='bn1')(x))
        # reduce_window pads with its init value, -inf, as PyTorch's MaxPool2d does.
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=layers.padding(3))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1, 3x3 (with the stride), 1x1 (x4), projection shortcut."""
    width: int
    strides: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        def bn(name):
            return layers.batch_norm(train=train, dtype=self.dtype, name=name)

        shortcut = x
        y = nn.relu(bn('bn1')(conv(self.width, 1, 1, self.dtype, 'conv1')(x)))
        y = nn.relu(bn('bn2')(conv(self.width, 3, self.strides, self.dtype, 'conv2')(y)))
        y = bn('bn3')(conv(4 * self.width, 1, 1, self.dtype, 'conv3')(y))
        if self.downsample:
            shortcut = conv(4 * self.width, 1, self.strides, self.dtype, 'downsample_conv')(x)
            shortcut = bn('downsample_bn')(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet-50 v1.5 with a cosine classifier; 18 layers `stem, block00..block15, head`.

    Attributes:
      num_classes: classifier outputs.
      width: stem width and first-stage bottleneck width (64 for ResNet-50; 8 in tests).
      stage_sizes: bottlenecks per stage; must sum to 16 (the 18-layer contract).
      tau: cosine classifier temperature.
      num_frozen: layers `[0, num_frozen)` are frozen (see `layers.run_layers`).
      frozen_bn: 'inference' (frozen BN uses running statistics) or 'adapt'.
      dtype: compute dtype; parameters and BatchNorm statistics stay float32.
    """
    num_classes: int
    width: int = 64
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    tau: float = 0.1
    num_frozen: int = 0
    frozen_bn: str = 'inference'
    dtype: Any = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        if sum(self.stage_sizes) != layers.NUM_LAYERS - 2:
            raise ValueError(f'stage_sizes must sum to {layers.NUM_LAYERS - 2} (18 layers), got '
                             f'{tuple(self.stage_sizes)}')
        layers.check_frozen(self.num_frozen, self.frozen_bn)

    def layer_names(self) -> tuple[str, ...]:
        return ('stem', *(f'block{i:02d}' for i in range(sum(self.stage_sizes))), 'head')

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (float32 logits [b, num_classes], {layer name: layer output})."""
        names = iter(self.layer_names())
        modules = [Stem(self.width, self.dtype, name=next(names))]
        for stage, size in enumerate(self.stage_sizes):
            for block in range(size):
                modules.append(Bottleneck(
                    self.width * 2**stage, strides=2 if stage > 0 and block == 0 else 1,
                    downsample=block == 0, dtype=self.dtype, name=next(names)))
        head = layers.CosineClassifier(self.num_classes, self.tau, pool=True, name=next(names))
        modules.append(lambda y, train: head(y))
        named = zip(self.layer_names(), modules)
        return layers.run_layers(named, x.astype(self.dtype), train=train,
                                 num_frozen=self.num_frozen, frozen_bn=self.frozen_bn)
