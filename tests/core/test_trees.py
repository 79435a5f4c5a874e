"""fedjaxsim.core.trees against NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxsim.core.trees import (
    sgd_step,
    tree_add,
    tree_divide,
    tree_is_finite,
    tree_l2_norm,
    tree_masked_scale,
    tree_scale,
    tree_size,
    tree_squared_norm,
    tree_subtract,
    tree_where,
    tree_zeros_like,
)

FLOAT32_MAX = float(np.finfo(np.float32).max)


def _tree(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": (scale * rng.normal(size=(7, 5))).astype(np.float32),
            "bias": (scale * rng.normal(size=(5,))).astype(np.float32),
        },
        "scalar": np.float32(scale * rng.normal()),
        "half": (scale * rng.normal(size=(3,))).astype(np.float16),
    }


def _squares64(tree):
    return sum(float(np.sum(np.asarray(leaf, np.float64) ** 2)) for leaf in jax.tree.leaves(tree))


def _assert_tree(actual, expected, exact=False, **tolerances):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert np.asarray(a).dtype == np.asarray(e).dtype
        if exact:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
        else:
            np.testing.assert_allclose(
                np.asarray(a, np.float64), np.asarray(e, np.float64), **tolerances
            )


def test_squared_and_l2_norm_equal_float64():
    tree = _tree()
    squares = _squares64(tree)
    assert tree_squared_norm(tree).dtype == jnp.float32
    np.testing.assert_allclose(float(tree_squared_norm(tree)), squares, rtol=1e-6)
    np.testing.assert_allclose(float(tree_l2_norm(tree)), np.sqrt(squares), rtol=1e-6)
    assert float(tree_squared_norm({})) == 0.0 and float(tree_l2_norm(())) == 0.0
    # Under jit and vmap (per client), as the engine calls it.
    stacked = jax.tree.map(lambda *leaves: np.stack(leaves), _tree(1), _tree(2), _tree(3))
    per_client = jax.jit(jax.vmap(tree_squared_norm))(stacked)
    np.testing.assert_allclose(per_client, [_squares64(_tree(s)) for s in (1, 2, 3)], rtol=1e-6)


def test_half_precision_leaves_are_squared_in_float32():
    """300^2 * 3 overflows float16 (max 65504), not the float32 norm."""
    tree = {"half": np.full((3,), 300.0, np.float16)}
    np.testing.assert_allclose(float(tree_squared_norm(tree)), 3 * 300.0**2, rtol=1e-6)
    assert bool(tree_is_finite(tree))


@pytest.mark.parametrize(
    "values",
    [
        [1.0, -2.0],
        [1e19, 1e19],  # 2e38: finite
        [1.8e19],  # 3.24e38: finite
        [1.9e19],  # 3.61e38: beyond float32
        [1.5e19, -1.5e19],  # each square finite, their sum is not
        [np.nan, 0.0],
        [np.inf, 1.0],
        [-np.inf],
    ],
)
def test_finiteness_is_that_of_the_float32_squared_norm(values):
    """Finite iff every element is finite and the sum of squares fits float32:
    elements beyond about 1e19 count as diverged."""
    tree = {"a": np.asarray(values, np.float32), "b": np.ones((2, 2), np.float32)}
    with np.errstate(invalid="ignore", over="ignore"):
        expected = bool(np.all(np.isfinite(tree["a"]))) and _squares64(tree) <= FLOAT32_MAX
    assert bool(tree_is_finite(tree)) == expected
    assert bool(jax.jit(tree_is_finite)(tree)) == expected


def test_divide_by_a_positive_total_and_by_zero():
    tree = _tree(scale=3.0)
    expected = jax.tree.map(
        lambda leaf: (np.asarray(leaf, np.float64) / 4.0).astype(leaf.dtype), tree
    )
    _assert_tree(tree_divide(tree, 4.0), expected, rtol=1e-3)
    _assert_tree(tree_divide(tree, jnp.float32(4.0)), tree_divide(tree, 4.0), exact=True)
    zeros = jax.tree.map(np.zeros_like, tree)
    # Nothing to average: exact zeros, whatever the tree holds (NaN included).
    poisoned = jax.tree.map(lambda leaf: np.full_like(leaf, np.nan), tree)
    for total in (0.0, -1.0, jnp.float32(0.0)):
        _assert_tree(tree_divide(tree, total), zeros, exact=True)
        _assert_tree(tree_divide(poisoned, total), zeros, exact=True)
    # Gradients stay finite at zero (the safe denominator), as jit-traced code needs.
    grad = jax.grad(lambda t: jnp.sum(tree_divide({"x": jnp.ones(3)}, t)["x"]))(0.0)
    assert np.isfinite(grad)


def test_masked_scale_gives_exact_zeros_over_nan():
    tree = {"a": np.array([1.0, np.nan, -np.inf], np.float32), "b": np.array([2.0], np.float16)}
    kept = tree_masked_scale(tree, 0.5, True)
    np.testing.assert_array_equal(kept["a"], [0.5, np.nan, -np.inf])
    assert kept["b"].dtype == np.float16 and float(kept["b"][0]) == 1.0
    dropped = tree_masked_scale(tree, 0.5, False)
    _assert_tree(dropped, {"a": np.zeros(3, np.float32), "b": np.zeros(1, np.float16)}, exact=True)
    # Why a mask and not a factor of zero: 0 * NaN is NaN.
    assert np.isnan(np.asarray(tree_scale(jax.tree.map(jnp.asarray, tree), 0.0)["a"][1]))
    # A traced mask, per client under vmap.
    keep = jnp.array([True, False])
    stacked = {"a": jnp.stack([jnp.ones(3), jnp.full(3, jnp.nan)])}
    out = jax.vmap(lambda t, k: tree_masked_scale(t, 2.0, k))(stacked, keep)
    np.testing.assert_array_equal(out["a"], [[2.0] * 3, [0.0] * 3])


def test_elementwise_helpers_equal_numpy():
    a, b = _tree(1), _tree(2)

    def as64(tree):
        return jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), tree)

    def cast(tree, like):  # back to each leaf's dtype, as the library keeps it
        return jax.tree.map(lambda x, y: np.asarray(x).astype(np.asarray(y).dtype), tree, like)

    _assert_tree(tree_add(a, b), cast(jax.tree.map(np.add, as64(a), as64(b)), a), rtol=1e-3)
    _assert_tree(
        tree_subtract(a, b),
        cast(jax.tree.map(np.subtract, as64(a), as64(b)), a),
        rtol=1e-3,
        atol=1e-3,
    )
    _assert_tree(tree_scale(a, 2.5), cast(jax.tree.map(lambda x: 2.5 * x, as64(a)), a), rtol=1e-3)
    _assert_tree(tree_zeros_like(a), jax.tree.map(np.zeros_like, a), exact=True)
    _assert_tree(tree_where(True, a, b), a, exact=True)
    _assert_tree(tree_where(jnp.bool_(False), a, b), b, exact=True)
    stepped = sgd_step(a, b, 0.1)
    _assert_tree(
        stepped,
        cast(jax.tree.map(lambda p, d: p - 0.1 * d, as64(a), as64(b)), a),
        rtol=1e-3,
        atol=1e-3,
    )


def test_size_counts_scalars_of_arrays_and_shape_structs():
    tree = _tree()
    assert tree_size(tree) == 7 * 5 + 5 + 1 + 3
    shapes = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), np.asarray(leaf).dtype), tree
    )
    assert tree_size(shapes) == tree_size(tree)
    assert tree_size({}) == 0
