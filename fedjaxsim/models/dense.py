"""A dense layer whose gradients XLA:CPU computes with its fast kernels.

The weight gradient of ``x @ w`` is ``x^T @ g``: a dot whose left operand is
transposed. On XLA:CPU (jax 0.10.2) YNNPACK does not take that form and the
dot falls back to Eigen, which made it the largest single cost of a
small-batch training step. With ``cpu_gradients`` (what :func:`~fedjaxsim.models.get_model`
picks on the CPU backend), :func:`affine` materialises ``x^T`` (or ``g^T``,
whichever is smaller) behind an optimization barrier, so the weight gradient
is a plain dot, and the bias gradient comes out of the same dot (a row of
ones appended to ``x^T``) instead of a column reduction. Elsewhere it is
plain ``x @ w (+ b)``: GPU matmul libraries take transposed operands, and the
copy would only cost bandwidth. The measurements behind this are in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _weight_gradient(rows, grad_rows, with_bias: bool):
    """``rows^T @ grad_rows`` (and the bias gradient, the column sums of
    ``grad_rows``) as plain dots: whichever of ``rows`` and ``grad_rows`` is
    cheaper to transpose is materialised behind an optimization barrier.

    Transposing ``rows`` (with a row of ones appended, so the same dot also
    yields the bias gradient) costs ``rows.size``; transposing ``grad_rows``
    costs ``grad_rows.size`` plus the transpose of the [out, in] result, which
    is 4x fewer bytes for a patch convolution's ``[11520, 288]`` patches
    against a ``[11520, 64]`` gradient. A bias gradient as a dot also avoids
    XLA:CPU's column reduction, which re-runs the input-gradient fusion of the
    layer below.
    """
    num_rows, in_features = rows.shape
    out_features = grad_rows.shape[1]
    if rows.size <= grad_rows.size + in_features * out_features:
        lhs = jnp.transpose(rows)
        if with_bias:
            lhs = jnp.concatenate([lhs, jnp.ones((1, num_rows), rows.dtype)], axis=0)
        # The barrier keeps XLA from folding the transpose back into the dot.
        both = jax.lax.optimization_barrier(lhs) @ grad_rows
        return both[:in_features], (both[in_features] if with_bias else None)
    grad_transposed = jax.lax.optimization_barrier(jnp.transpose(grad_rows))
    # The second barrier keeps XLA from rewriting transpose(g^T @ x) as x^T @ g.
    weight_gradient = jnp.transpose(jax.lax.optimization_barrier(grad_transposed @ rows))
    return weight_gradient, (jnp.sum(grad_transposed, axis=1) if with_bias else None)


@jax.custom_vjp
def affine_with_plain_gradients(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """``x @ w (+ b)`` for ``x[..., k]``, ``w[k, n]`` and ``b[n]`` or None; the
    weight and bias gradients come from one plain dot (module docstring)."""
    return x @ w if b is None else x @ w + b


def _affine_forward(x, w, b):
    return affine_with_plain_gradients(x, w, b), (x, w, b)


def _affine_backward(residuals, g):
    x, w, b = residuals
    weight_gradient, bias_gradient = _weight_gradient(
        x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), b is not None
    )
    bias_gradient = None if b is None else bias_gradient.astype(b.dtype)
    return g @ jnp.transpose(w), weight_gradient.astype(w.dtype), bias_gradient


affine_with_plain_gradients.defvjp(_affine_forward, _affine_backward)


def affine(
    x: jax.Array, w: jax.Array, b: jax.Array | None, cpu_gradients: bool = False
) -> jax.Array:
    """``x @ w (+ b)``; with ``cpu_gradients`` its gradients are plain dots (module docstring)."""
    if cpu_gradients:
        return affine_with_plain_gradients(x, w, b)
    return x @ w if b is None else x @ w + b


class Dense(nn.Module):
    """``flax.linen.Dense`` (same parameters, names and initialisers), with the
    CPU form of the gradients when ``cpu_gradients``."""

    features: int
    cpu_gradients: bool = False

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (inputs.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return affine(
            inputs, kernel.astype(inputs.dtype), bias.astype(inputs.dtype), self.cpu_gradients
        )
