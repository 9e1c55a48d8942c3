"""Pieces shared by the models: cosine classifier, BatchNorm defaults, exact GELU, padding.

Each default here is a PyTorch-to-Flax trap (docs/paper.md §2): Flax's GELU is the tanh
approximation unless told otherwise, its BatchNorm momentum is the complement of PyTorch's, and
`padding='SAME'` on a stride-2 convolution pads bottom/right only where PyTorch pads both sides.
"""

from __future__ import annotations

import collections
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_LAYERS = 18  # The layer contract of docs/paper.md §2: both models have exactly 18 layers.
FROZEN_BN = ('inference', 'adapt')

# PyTorch BatchNorm2d defaults: momentum 0.1 in PyTorch's convention is 0.9 in Flax's.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# PyTorch nn.LayerNorm default (Flax's default is 1e-6).
LN_EPSILON = 1e-5
# PyTorch nn.Conv2d / nn.Linear default init: kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's nn.GELU(); Flax's nn.gelu defaults to the tanh form."""
    return nn.gelu(x, approximate=False)


def padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit symmetric padding k // 2 on both spatial sides, as PyTorch's `padding=k // 2`.

    With stride 2 on an even input, Flax's 'SAME' pads (0, 1) where PyTorch pads (1, 1), which
    shifts every output pixel by one input pixel; explicit padding gives identical outputs.
    """
    p = kernel_size // 2
    return ((p, p), (p, p))


def batch_norm(*, train: bool, dtype: Any, scale_init: Any = nn.initializers.ones,
               name: str | None = None) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults; statistics and parameters stay in float32.

    No `axis_name`: under `jit` with a batch sharded over the mesh, the batch statistics are
    already global.
    """
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        dtype=dtype, param_dtype=jnp.float32, scale_init=scale_init, name=name)


def layer_norm(*, dtype: Any, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with PyTorch's epsilon; parameters in float32."""
    return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, param_dtype=jnp.float32, name=name)


def l2_normalize(x: jax.Array, axis: int, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps), as torch.nn.functional.normalize, with its finite gradient at an
    all-zero x (1 / eps): the clamp comes before the square root, whose derivative at 0 is
    infinite (times 0: NaN, which the NaN check would then blame on the learning rate)."""
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), eps * eps))
    return x / norm


class CosineClassifier(nn.Module):
    """Bias-free cosine classifier (docs/paper.md §3): cos(feature, class weight) / tau.

    Features and class weights are both L2-normalised, so logits lie in [-1/tau, 1/tau] and do
    not change when the features are scaled. The kernel has shape (features, num_classes) and a
    normal init: a zero init would make the normalisation divide by zero. Computed in float32
    whatever the model's compute dtype; the logits are float32.

    Attributes:
      num_classes: number of classes.
      tau: temperature.
      pool: average the spatial axes of an NHWC input first (ResNet's global average pool).
    """
    num_classes: int
    tau: float = 0.1
    pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # At least float32 (bf16 features would lose the cosine's precision); float64 stays.
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.pool:
            x = jnp.mean(x, axis=(1, 2))
        kernel = self.param('kernel', nn.initializers.normal(stddev=0.01),
                            (x.shape[-1], self.num_classes), jnp.float32)
        return l2_normalize(x, axis=-1) @ l2_normalize(kernel.astype(x.dtype), axis=0) / self.tau


class Dense(nn.Module):
    """`nn.Dense` whose product is kept in float32 and its bias added there, then cast to dtype.

    Same parameters as `nn.Dense(features)`: 'kernel' (in, features) and 'bias' (features,),
    float32, created in the same order (the same initial values). In bf16, nn.Dense adds a bf16
    bias, so the bias's gradient is a bf16 sum over every token: 3.6% off the float32 gradient
    over (32, 196, 160) tokens (TinyViT's attention); summed in float32 here. Float32 computes
    exactly as nn.Dense.
    """
    features: int
    kernel_init: Any = torch_default_init
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype),
                    preferred_element_type=jnp.promote_types(self.dtype, jnp.float32))
        return (y + bias).astype(self.dtype)


class PointwiseConv(nn.Module):
    """Bias-free 1x1 convolution (stride s, no padding) computed as a matmul.

    Same parameter as `nn.Conv(features, (1, 1), use_bias=False)`: 'kernel' of shape
    (1, 1, in, features). XLA's CPU convolution is slower than a dot for 1x1 kernels,
    mostly in the backward pass: a ResNet-50 train step (224 px, batch 8, 2 cores) took
    about 22% less CPU time this way (3.9 s against 5.0 s per step, measured under load).
    """
    features: int
    strides: int = 1
    kernel_init: Any = torch_default_init
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features),
                            jnp.float32)
        x = x[:, ::self.strides, ::self.strides]  # PyTorch: pixels 0, s, 2s, ... (no padding)
        return jnp.einsum('bhwc,cd->bhwd', x.astype(self.dtype), kernel[0, 0].astype(self.dtype))


def shifted_windows(x: jax.Array, kernel_size: int, strides: int) -> list[jax.Array]:
    """The k * k input windows of a k x k convolution (stride s, zero padding k // 2 on both
    sides, as PyTorch's): window (i, j) is the input pixel each output pixel multiplies by the
    kernel's tap (i, j), so the convolution is sum over (i, j) of window * kernel[i, j]."""
    k, s, p = kernel_size, strides, kernel_size // 2
    b, h, w, c = x.shape
    out_h, out_w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return [jax.lax.slice(x, (0, i, j, 0),
                          (b, i + (out_h - 1) * s + 1, j + (out_w - 1) * s + 1, c), (1, s, s, 1))
            for i in range(k) for j in range(k)]


class Conv(nn.Module):
    """Bias-free k x k convolution with PyTorch's symmetric padding k // 2.

    Same parameter as `nn.Conv(features, (k, k), use_bias=False)`: 'kernel' of shape
    (k, k, in, features). Where the kernel window covers more pixels than the input or the
    output has (k * k > h * w: ResNet's last stage on a 48 px crop is 2 x 2), XLA swaps the
    operands of the convolution or of its gradient (its ConvOperandSwapper), and the CPU backend
    runs the swapped convolution in a generic loop: 2.1 s forward + backward for a 3 x 3
    convolution over (32, 2, 2, 512) on 2 cores, 0.02 s as one matmul over the concatenated
    windows (im2col), which is what it is there. Elsewhere XLA's convolution: on larger images
    it is the faster of the two.
    """
    features: int
    kernel_size: int
    strides: int = 1
    kernel_init: Any = torch_default_init
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.strides
        kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                            jnp.float32).astype(self.dtype)
        x = x.astype(self.dtype)
        _, h, w, _ = x.shape
        out_h, out_w = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
        if min(h * w, out_h * out_w) >= k * k:
            return jax.lax.conv_general_dilated(x, kernel, (s, s), padding(k),
                                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        windows = shifted_windows(x, k, s)
        return jnp.concatenate(windows, axis=-1) @ kernel.reshape(-1, self.features)


class DepthwiseConv(nn.Module):
    """Bias-free depthwise convolution (PyTorch `groups=channels`, padding k // 2).

    Same parameter as `nn.Conv(C, (k, k), feature_group_count=C, use_bias=False)`: 'kernel' of
    shape (k, k, 1, C), PyTorch's default init. Computed as a sum of k * k shifted slices times
    per-channel weights, which XLA fuses into one elementwise loop: on CPU (2 cores) a 3x3
    depthwise conv over (8, 56, 56, 256) takes 9 ms forward and 0.18 s forward + backward this
    way, against 0.17 s and 1.05 s for XLA's grouped convolution. Multiplies and accumulates
    in float32 whatever `dtype` (the inputs are rounded to it first).
    """
    kernel_size: int = 3
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param('kernel', torch_default_init, (k, k, 1, x.shape[-1]), jnp.float32)
        windows = shifted_windows(x.astype(self.dtype), k, self.strides)
        out = jnp.zeros(windows[0].shape, jnp.promote_types(self.dtype, jnp.float32))
        for tap, window in enumerate(windows):
            # The float32 kernel makes each product float32, so the kernel's gradient (a sum
            # over every pixel) is summed in float32 too: in bf16 it was 7% off.
            out = out + window * kernel[tap // k, tap % k, 0]
        return out.astype(self.dtype)


def check_frozen(num_frozen: int, frozen_bn: str) -> None:
    """Raises ValueError unless 0 <= num_frozen <= 18 and frozen_bn is a known mode."""
    if not 0 <= num_frozen <= NUM_LAYERS:
        raise ValueError(f'num_frozen must be in [0, {NUM_LAYERS}], got {num_frozen}')
    if frozen_bn not in FROZEN_BN:
        raise ValueError(f'frozen_bn must be one of {FROZEN_BN}, got {frozen_bn!r}')


def run_layers(named_layers, x: jax.Array, *, train: bool, num_frozen: int, frozen_bn: str):
    """Runs `(name, layer)` pairs in order under the freezing contract of `models.build`.

    Layers `i < num_frozen` run BatchNorm on the running statistics (no update) unless
    `frozen_bn == 'adapt'`; a stop_gradient follows layer `num_frozen - 1`, so no backward pass
    runs through the frozen prefix.

    Returns:
      (output of the last layer, {name: output of each layer}). The dict is an OrderedDict,
      the pytree whose keys JAX keeps in insertion (forward) order through jit and
      eval_shape; a plain dict would come back sorted.
    """
    out = collections.OrderedDict()
    for i, (name, layer) in enumerate(named_layers):
        frozen = i < num_frozen
        x = layer(x, train=train and (not frozen or frozen_bn == 'adapt'))
        if i == num_frozen - 1:
            x = jax.lax.stop_gradient(x)
        out[name] = x
    return x, out
