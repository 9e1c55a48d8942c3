"""TinyViT-5M (Wu et al., 2022, "TinyViT: Fast Pretraining Distillation for Small Vision
Transformers"), mirroring timm's `timm/models/tiny_vit.py`.

Module and parameter names follow timm's (`conv1/conv2/conv3` with `conv`/`bn` inside,
`attn.norm/qkv/proj/attention_biases`, `local_conv`, `mlp.norm/fc1/fc2`) and parameter shapes
match it up to PyTorch-to-Flax layout (conv kernels HWIO, dense kernels transposed), so a weight
converter maps tensors by name. The qkv projection keeps timm's head-major layout: its output is
viewed as (heads, [q | k | v]).

Layers (docs/paper.md §2), in forward order (18):
  patch_embed; stage0_mbconv0, stage0_mbconv1; stage1_downsample, stage1_block0..1;
  stage2_downsample, stage2_block0..5; stage3_downsample, stage3_block0..1;
  norm (mean pooling over tokens, then LayerNorm); head (cosine classifier).

Details that matter: exact-erf GELU; LayerNorm eps 1e-5; the attention bias table per head is
indexed by |drow| * w + |dcol|; windows are zero-padded bottom/right with no mask (padded tokens
take part in attention as keys, as in timm); a depthwise 3x3 conv + BN sits between attention and
MLP with no residual; MBConv applies GELU after its residual add and its last BN starts at scale
0. Any input size works: at 96 px the stage resolutions are 24/12/6/3 and windows are padded.
Data layout is NHWC throughout (timm flattens tokens; the maths is the same).

BatchNorm has no `axis_name`: under `jit` with a sharded batch the statistics are global.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdtl_jax.models import layers

# The 18-layer contract fixes the depths: 2 MBConv, then 2 / 6 / 2 TinyViT blocks.
DEPTHS = (2, 2, 6, 2)
# timm's _init_weights: trunc_normal_(std=.02) with absolute bounds +-2 (100 std), i.e. a normal.
dense_init = nn.initializers.normal(stddev=0.02)


def dense(features: int, dtype: Any, name: str) -> layers.Dense:
    return layers.Dense(features, dense_init, dtype, name=name)


class ConvNorm(nn.Module):
    """timm's ConvNorm: bias-free conv (symmetric padding k // 2) then BatchNorm."""
    features: int
    kernel_size: int = 1
    strides: int = 1
    groups: int = 1
    bn_scale_init: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        k = self.kernel_size
        if self.groups == 1 and k == 1:
            x = layers.PointwiseConv(self.features, self.strides, dtype=self.dtype, name='conv')(x)
        elif self.groups == 1:
            x = layers.Conv(self.features, k, self.strides, dtype=self.dtype, name='conv')(x)
        elif self.groups == self.features == x.shape[-1]:  # Depthwise: fast on CPU.
            x = layers.DepthwiseConv(k, self.strides, self.dtype, name='conv')(x)
        else:
            raise ValueError(f'ConvNorm supports groups=1 or depthwise, got groups={self.groups}')
        return layers.batch_norm(train=train, dtype=self.dtype,
                                 scale_init=nn.initializers.constant(self.bn_scale_init),
                                 name='bn')(x)


class PatchEmbed(nn.Module):
    """Two 3x3/2 ConvNorms with a GELU between them: stride 4, channels 3 -> dim / 2 -> dim."""
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = ConvNorm(self.dim // 2, 3, 2, dtype=self.dtype, name='conv1')(x, train=train)
        return ConvNorm(self.dim, 3, 2, dtype=self.dtype, name='conv2')(layers.gelu(x),
                                                                         train=train)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project (BN scale 0), add, GELU."""
    dim: int
    expand_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        hidden = int(self.dim * self.expand_ratio)
        y = layers.gelu(ConvNorm(hidden, 1, dtype=self.dtype, name='conv1')(x, train=train))
        y = ConvNorm(hidden, 3, groups=hidden, dtype=self.dtype, name='conv2')(y, train=train)
        y = ConvNorm(self.dim, 1, bn_scale_init=0.0, dtype=self.dtype,
                     name='conv3')(layers.gelu(y), train=train)
        return layers.gelu(y + x)


class PatchMerging(nn.Module):
    """Downsampling: 1x1 conv, GELU, 3x3/2 depthwise conv, GELU, 1x1 conv (all with BN)."""
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        d = self.out_dim
        x = layers.gelu(ConvNorm(d, 1, dtype=self.dtype, name='conv1')(x, train=train))
        x = layers.gelu(ConvNorm(d, 3, 2, groups=d, dtype=self.dtype, name='conv2')(x,
                                                                                   train=train))
        return ConvNorm(d, 1, dtype=self.dtype, name='conv3')(x, train=train)


def attention_bias_idxs(window_size: int) -> np.ndarray:
    """timm's attention_bias_idxs for a square window: [N, N] with entries |dr| * w + |dc|."""
    rows, cols = np.divmod(np.arange(window_size * window_size), window_size)
    return (np.abs(rows[:, None] - rows[None, :]) * window_size
            + np.abs(cols[:, None] - cols[None, :]))


@jax.custom_vjp
def add_window_bias(logits: jax.Array, bias: jax.Array) -> jax.Array:
    """`logits + bias` for logits [windows, ...] and a bias shared by every window.

    The same sum, with the bias's gradient (the window axis summed away) as a matrix-vector
    product with ones: XLA:CPU hands the plain reduction over the leading axis to YNNPACK,
    which took 0.05 s for (32, 5, 196, 196) where the product takes 0.004 s, a third of
    TinyViT-5M's CPU train step at the benchmark's reduced size.
    """
    return logits + bias


def _add_window_bias_fwd(logits, bias):
    return logits + bias, None


def _add_window_bias_bwd(_, grad):
    ones = jnp.ones((grad.shape[0],), grad.dtype)
    return grad, jnp.tensordot(ones, grad, axes=(0, 0))


add_window_bias.defvjp(_add_window_bias_fwd, _add_window_bias_bwd)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention in one window, with a learned relative-offset bias."""
    dim: int
    num_heads: int
    window_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        head_dim = self.dim // self.num_heads
        biases = self.param('attention_biases', nn.initializers.zeros,
                            (self.num_heads, self.window_size ** 2), jnp.float32)
        x = layers.layer_norm(dtype=self.dtype, name='norm')(x)
        qkv = dense(3 * self.dim, self.dtype, 'qkv')(x).reshape(b, n, self.num_heads, -1)
        # timm: view(B, N, heads, -1).split([kd, kd, d]), each permuted to (B, heads, N, d), the
        # layout whose products are plain batched matmuls (faster on CPU than bqhd's).
        q, k, v = jnp.split(qkv.transpose(0, 2, 1, 3), 3, axis=-1)
        logits = jnp.einsum('bhqd,bhkd->bhqk', q * head_dim ** -0.5, k,
                            preferred_element_type=jnp.float32)
        logits = add_window_bias(logits, biases[:, attention_bias_idxs(self.window_size)])
        # Softmax with its division after the product with v, on (N, d) rather than (N, N):
        # the same value, and a TinyViT block's train step 20% faster on CPU.
        e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        x = jnp.einsum('bhqk,bhkd->bhqd', e.astype(self.dtype), v,
                       preferred_element_type=jnp.float32) / jnp.sum(e, axis=-1, keepdims=True)
        x = x.astype(self.dtype).transpose(0, 2, 1, 3).reshape(b, n, self.dim)
        return dense(self.dim, self.dtype, 'proj')(x)


class Mlp(nn.Module):
    """Pre-norm MLP: LayerNorm, fc1, GELU, fc2."""
    dim: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.layer_norm(dtype=self.dtype, name='norm')(x)
        x = layers.gelu(dense(self.hidden, self.dtype, 'fc1')(x))
        return dense(self.dim, self.dtype, 'fc2')(x)


class TinyViTBlock(nn.Module):
    """Window attention (+ residual), depthwise 3x3 ConvNorm (no residual), MLP (+ residual)."""
    dim: int
    num_heads: int
    window_size: int
    mlp_ratio: float = 4.0
    local_conv_size: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        b, h, w, c = x.shape
        ws = self.window_size
        # Pad bottom/right to whole windows; padded tokens are not masked (as in timm).
        pad_b, pad_r = -h % ws, -w % ws
        y = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
        nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
        y = y.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        y = Attention(self.dim, self.num_heads, ws, self.dtype, name='attn')(y)
        y = y.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
        x = x + y.reshape(b, nh * ws, nw * ws, c)[:, :h, :w]
        x = ConvNorm(self.dim, self.local_conv_size, groups=self.dim, dtype=self.dtype,
                     name='local_conv')(x, train=train)
        return x + Mlp(self.dim, int(self.dim * self.mlp_ratio), self.dtype, name='mlp')(x)


class TinyViT(nn.Module):
    """TinyViT (defaults: 5M) with a cosine classifier; 18 layers, see the module docstring.

    Attributes:
      num_classes: classifier outputs.
      embed_dims: channels per stage (5M: 64, 128, 160, 320).
      num_heads: attention heads per stage (stage 0 is convolutional; its entry is unused).
      window_sizes: attention window per stage (stage 0's entry is unused).
      mlp_ratio: MLP hidden / dim.
      mbconv_expand_ratio: MBConv hidden / dim.
      tau: cosine classifier temperature.
      num_frozen: layers `[0, num_frozen)` are frozen (see `layers.run_layers`).
      frozen_bn: 'inference' (frozen BN uses running statistics) or 'adapt'.
      dtype: compute dtype; parameters, BatchNorm statistics and softmax stay float32.
    """
    num_classes: int
    embed_dims: Sequence[int] = (64, 128, 160, 320)
    num_heads: Sequence[int] = (2, 4, 5, 10)
    window_sizes: Sequence[int] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    tau: float = 0.1
    num_frozen: int = 0
    frozen_bn: str = 'inference'
    dtype: Any = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        stages = len(DEPTHS)
        for field in ('embed_dims', 'num_heads', 'window_sizes'):
            if len(getattr(self, field)) != stages:
                raise ValueError(f'{field} needs {stages} entries (one per stage), got '
                                 f'{tuple(getattr(self, field))}')
        if self.embed_dims[0] % 2:
            raise ValueError(f'embed_dims[0] must be even, got {self.embed_dims[0]}')
        for s in range(1, stages):
            if self.embed_dims[s] % self.num_heads[s]:
                raise ValueError(f'embed_dims[{s}]={self.embed_dims[s]} is not divisible by '
                                 f'num_heads[{s}]={self.num_heads[s]}')
        layers.check_frozen(self.num_frozen, self.frozen_bn)

    def layer_names(self) -> tuple[str, ...]:
        names = ['patch_embed', *(f'stage0_mbconv{i}' for i in range(DEPTHS[0]))]
        for s in range(1, len(DEPTHS)):
            names += [f'stage{s}_downsample', *(f'stage{s}_block{i}' for i in range(DEPTHS[s]))]
        return (*names, 'norm', 'head')

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (float32 logits [b, num_classes], {layer name: layer output})."""
        names = iter(self.layer_names())
        dims, dtype = self.embed_dims, self.dtype
        modules = [PatchEmbed(dims[0], dtype, name=next(names))]
        modules += [MBConv(dims[0], self.mbconv_expand_ratio, dtype, name=next(names))
                    for _ in range(DEPTHS[0])]
        for s in range(1, len(DEPTHS)):
            modules.append(PatchMerging(dims[s], dtype, name=next(names)))
            modules += [TinyViTBlock(dims[s], self.num_heads[s], self.window_sizes[s],
                                     self.mlp_ratio, dtype=dtype, name=next(names))
                        for _ in range(DEPTHS[s])]
        norm = layers.layer_norm(dtype=dtype, name=next(names))
        head = layers.CosineClassifier(self.num_classes, self.tau, name=next(names))
        modules.append(lambda y, train: norm(jnp.mean(y, axis=(1, 2))))
        modules.append(lambda y, train: head(y))
        named = zip(self.layer_names(), modules)
        return layers.run_layers(named, x.astype(dtype), train=train,
                                 num_frozen=self.num_frozen, frozen_bn=self.frozen_bn)
