"""A VALID convolution with three interchangeable lowerings.

``Conv`` holds the same parameters as ``flax.linen.Conv`` (``kernel`` of shape
``[kh, kw, in, out]`` and ``bias``) and computes the same function, lowered as
``lax.conv_general_dilated`` ("lax"), as "patches": the ``kh * kw`` shifted
slices of the input concatenated on the channel axis, then one matmul, or as
oneDNN's convolution through ``jax.ffi`` ("onednn", CPU only,
``fedjaxsim.models.conv_onednn``). On XLA:CPU a convolution's gradient inside
any loop is an order of magnitude slower (jax issue 12868) and vmap over
per-client kernels becomes a grouped convolution; the patches form avoids
both, and also beat grouped convolutions on GPUs (benchmarks/RESULTS.md).
oneDNN's kernels avoid the loop trap too and are faster than patches on CPU;
where oneDNN cannot be loaded, or for inputs that are not float32, "onednn"
computes the patches form. The lowering is chosen when the model is built
(``fedjaxsim.models.get_model``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjaxsim.models.dense import affine

LOWERINGS = ("patches", "lax", "onednn")


def conv2d_valid(
    inputs: jax.Array,
    kernel: jax.Array,
    lowering: str,
    bias: jax.Array | None = None,
    cpu_gradients: bool = False,
) -> jax.Array:
    """Stride-1 VALID 2-D convolution of NHWC ``inputs`` with an HWIO ``kernel``,
    plus ``bias`` (per output channel) if given.

    ``cpu_gradients`` applies to the patches lowering (``models/dense.py``).
    """
    if lowering == "onednn":
        from fedjaxsim.models import conv_onednn

        if inputs.dtype == jnp.float32 and conv_onednn.available():
            return conv_onednn.conv2d_valid(inputs, kernel, bias)
        lowering = "patches"
    if lowering == "lax":
        outputs = jax.lax.conv_general_dilated(
            inputs,
            kernel,
            window_strides=(1, 1),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return outputs if bias is None else outputs + bias
    if lowering != "patches":
        raise ValueError(f"unknown conv lowering {lowering!r}; use one of {LOWERINGS}")
    kernel_h, kernel_w, in_features, out_features = kernel.shape
    out_h = inputs.shape[-3] - kernel_h + 1
    out_w = inputs.shape[-2] - kernel_w + 1
    # Order (i, j, channel) matches kernel.reshape(kh * kw * in, out).
    patches = jnp.concatenate(
        [
            inputs[..., i : i + out_h, j : j + out_w, :]
            for i in range(kernel_h)
            for j in range(kernel_w)
        ],
        axis=-1,
    )
    weights = kernel.reshape(kernel_h * kernel_w * in_features, out_features)
    return affine(patches, weights, bias, cpu_gradients)


class Conv(nn.Module):
    """Stride-1 VALID convolution lowered as ``lowering`` ("patches", "lax" or "onednn")."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    lowering: str = "patches"
    cpu_gradients: bool = False

    @nn.compact
    def __call__(self, inputs):
        in_features = inputs.shape[-1]
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*self.kernel_size, in_features, self.features),
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return conv2d_valid(
            inputs,
            kernel.astype(inputs.dtype),
            self.lowering,
            bias.astype(inputs.dtype),
            self.cpu_gradients,
        )


def max_pool_2x2(inputs: jax.Array) -> jax.Array:
    """2x2 stride-2 max pooling of NHWC inputs with even height and width.

    A reshape and a max, rather than ``reduce_window``, whose gradient
    (select-and-scatter) is slow inside loops on XLA:CPU.
    """
    *batch, height, width, channels = inputs.shape
    blocks = inputs.reshape(*batch, height // 2, 2, width // 2, 2, channels)
    return blocks.max(axis=(-4, -2))
