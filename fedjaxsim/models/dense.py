"""A dense layer whose weight gradient XLA:CPU computes with its fast kernels.

The weight gradient of ``x @ w`` is ``x^T @ g``: a dot whose left operand is
transposed. On XLA:CPU (jax 0.10.2) YNNPACK does not take that form and the dot
falls back to Eigen, which made it the largest single cost of a small-batch
training step (47 us of a 100 us logistic-regression step at batch 20). Under
the "patches" lowering (the CPU plan) on the CPU backend, :func:`matmul`
materialises ``x^T`` behind an optimization barrier, so the weight gradient is
a plain dot: the same product, 5-10% faster training steps for the built-in
models (benchmarks/RESULTS.md). Elsewhere it is plain ``x @ w``: GPU matmul
libraries take transposed operands, and the copy would only cost bandwidth.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjaxsim.core.lowering import current_conv_lowering


@jax.custom_vjp
def matmul_with_plain_weight_gradient(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for ``x[..., k]`` and ``w[k, n]``; see the module docstring."""
    return x @ w


def _forward(x, w):
    return x @ w, (x, w)


def _backward(residuals, g):
    x, w = residuals
    rows = x.reshape(-1, x.shape[-1])
    # The barrier keeps XLA from folding the transpose back into the dot.
    rows_transposed = jax.lax.optimization_barrier(jnp.transpose(rows))
    weight_gradient = rows_transposed @ g.reshape(-1, g.shape[-1])
    return g @ jnp.transpose(w), weight_gradient


matmul_with_plain_weight_gradient.defvjp(_forward, _backward)


def matmul(x: jax.Array, w: jax.Array, lowering: str | None = None) -> jax.Array:
    """``x @ w`` lowered for the plan in force ("patches" on CPU: the CPU form)."""
    lowering = current_conv_lowering() if lowering is None else lowering
    if lowering == "patches" and jax.default_backend() == "cpu":
        return matmul_with_plain_weight_gradient(x, w)
    return x @ w


class Dense(nn.Module):
    """``flax.linen.Dense`` (same parameters, names and initialisers) with the
    plan's matmul lowering."""

    features: int
    lowering: str | None = None

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (inputs.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return matmul(inputs, kernel.astype(inputs.dtype), self.lowering) + bias
