"""The oneDNN convolution (jax.ffi) against XLA's convolution, and its fallback."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxsim.models import conv_onednn
from fedjaxsim.models.conv import conv2d_valid

needs_onednn = pytest.mark.skipif(
    not conv_onednn.available(), reason=f"oneDNN: {conv_onednn.unavailable_reason()}"
)

SHAPES = [  # (inputs, kernel): the EMNIST CNN's two layers, odd sizes, leading batch axes
    ((20, 28, 28, 1), (3, 3, 1, 32)),
    ((20, 26, 26, 32), (3, 3, 32, 64)),
    ((3, 9, 7, 5), (2, 4, 5, 6)),
    ((2, 3, 8, 8, 4), (3, 3, 4, 7)),
]


def _problem(input_shape, kernel_shape, seed=0):
    rng = np.random.default_rng(seed)
    inputs = jnp.asarray(rng.normal(size=input_shape), jnp.float32)
    kernel = jnp.asarray(
        rng.normal(size=kernel_shape) / np.sqrt(np.prod(kernel_shape[:3])), jnp.float32
    )
    bias = jnp.asarray(rng.normal(size=kernel_shape[-1:]), jnp.float32)
    return inputs, kernel, bias


def _loss_and_grads(lowering, inputs, kernel, bias):
    def loss(inputs, kernel, bias):
        return jnp.sum(jnp.sin(conv2d_valid(inputs, kernel, lowering, bias)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(inputs, kernel, bias)


@needs_onednn
@pytest.mark.parametrize("input_shape,kernel_shape", SHAPES)
def test_onednn_matches_xla_convolution_and_its_gradients(input_shape, kernel_shape):
    problem = _problem(input_shape, kernel_shape)
    if len(input_shape) > 4:  # lax.conv takes one batch axis: fold the leading ones
        flat = problem[0].reshape(-1, *input_shape[-3:])
        expected = _loss_and_grads("lax", flat, *problem[1:])
        expected = (expected[0], (expected[1][0].reshape(input_shape), *expected[1][1:]))
    else:
        expected = _loss_and_grads("lax", *problem)
    got = _loss_and_grads("onednn", *problem)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    for name, a, b in zip(("inputs", "kernel", "bias"), got[1], expected[1]):
        assert a.shape == b.shape, name
        # float32 sums over up to 11,520 positions, ordered differently: the
        # tolerance scales with the gradient's size; a layout error is O(1).
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@needs_onednn
def test_onednn_is_used_and_runs_inside_a_loop():
    """Inside lax.fori_loop (the engine's local steps) it gives the patch
    lowering's SGD trajectory, and the traced step really calls oneDNN."""
    inputs, kernel, bias = _problem((4, 10, 10, 3), (3, 3, 3, 8))

    def train(lowering):
        def step(_, params):
            grads = jax.grad(
                lambda p: jnp.mean(jnp.sin(conv2d_valid(inputs, p[0], lowering, p[1])))
            )(params)
            return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)

        return jax.jit(lambda params: jax.lax.fori_loop(0, 5, step, params))((kernel, bias))

    jaxpr = str(jax.make_jaxpr(lambda k: conv2d_valid(inputs, k, "onednn", bias))(kernel))
    assert conv_onednn.PREFIX + "ConvForward" in jaxpr
    for a, b in zip(train("onednn"), train("patches")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_onednn_falls_back_to_patches(monkeypatch):
    """Without oneDNN, or for inputs that are not float32, "onednn" is the patch lowering."""
    inputs, kernel, bias = _problem((2, 6, 6, 3), (3, 3, 3, 4))
    expected = _loss_and_grads("patches", inputs, kernel, bias)
    monkeypatch.setattr(conv_onednn, "available", lambda: False)
    got = _loss_and_grads("onednn", inputs, kernel, bias)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    monkeypatch.undo()
    half = inputs.astype(jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda x: conv2d_valid(x, kernel, "onednn", bias))(half))
    assert conv_onednn.PREFIX not in jaxpr


def test_unavailable_reason_names_the_missing_piece(monkeypatch, tmp_path):
    monkeypatch.setenv("ONEDNN_ROOT", str(tmp_path))
    monkeypatch.setattr(conv_onednn.sys, "prefix", str(tmp_path))
    assert conv_onednn.onednn_root() is None
    if jax.default_backend() == "cpu":  # the uncached loader, in this environment
        assert "oneDNN not found" in conv_onednn._load.__wrapped__()
