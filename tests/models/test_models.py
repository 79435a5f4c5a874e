import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.lowering import conv_lowering
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.models import (
    classification_loss,
    conv2d_valid,
    count_params,
    from_functions,
    from_nnx,
    get_model,
    max_pool_2x2,
)
from tests.conftest import NUM_CLASSES, NUM_FEATURES, make_clients


def test_emnist_cnn_has_the_published_parameter_count():
    model = get_model("cnn", 62)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert count_params(shapes) == 1_206_590  # Reddi et al. 2020, Table 3


@pytest.mark.parametrize("name, expected", [("dense", 784 * 200 + 200 + 200 * 200 + 200 + 200 * 62 + 62), ("logreg", 784 * 62 + 62)])
def test_dense_and_logreg_parameter_counts(name, expected):
    shapes = jax.eval_shape(get_model(name, 62).init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert count_params(shapes) == expected


def test_patches_convolution_equals_lax_and_flax_conv():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 9, 7, 4)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
    via_lax = conv2d_valid(x, kernel, "lax")
    via_patches = conv2d_valid(x, kernel, "patches")
    flax_conv = nn.Conv(6, (3, 3), padding="VALID", use_bias=False)
    via_flax = flax_conv.apply({"params": {"kernel": kernel}}, x)
    np.testing.assert_allclose(via_patches, via_lax, atol=1e-5)
    np.testing.assert_allclose(via_patches, via_flax, atol=1e-5)
    # And an explicit float64 loop for one output pixel.
    expected = sum(
        x[1, 2 + i, 3 + j, c].astype(np.float64) * kernel[i, j, c, 5]
        for i in range(3) for j in range(3) for c in range(4)
    )
    np.testing.assert_allclose(via_patches[1, 2, 3, 5], expected, atol=1e-5)


@pytest.mark.parametrize(
    "in_features, out_features",
    [(7, 3), (40, 2), (3, 40)],
    ids=["either-transpose", "transposes-the-gradient", "transposes-the-inputs"],
)
def test_dense_layer_matches_flax_dense_and_a_float64_gradient(in_features, out_features):
    """The CPU form (weight and bias gradients from one plain dot over a
    materialised transpose of whichever of x and g is cheaper) computes the
    same layer: same parameters as flax.linen.Dense, same outputs, and input,
    weight and bias gradients equal to the closed form in float64, with and
    without vmap over clients and for inputs with extra leading axes. The
    shapes make the size rule take each transpose."""
    from fedjaxsim.models.dense import Dense

    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, in_features)).astype(np.float32)  # [clients, batch, features]
    cotangent = rng.normal(size=(2, 5, out_features)).astype(np.float32)
    ours, theirs = Dense(out_features, lowering="patches"), nn.Dense(out_features)
    params = ours.init(jax.random.key(0), x[0])
    assert jax.tree.structure(params) == jax.tree.structure(theirs.init(jax.random.key(0), x[0]))
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-5)

    def gradients(module, xs, cts):
        def objective(p, inputs):
            return jnp.sum(module.apply(p, inputs) * cts)

        return jax.grad(objective, argnums=(0, 1))(params, xs)

    kernel = np.asarray(params["params"]["kernel"], np.float64)
    expected_kernel = np.einsum("cbi,cbo->io", x.astype(np.float64), cotangent.astype(np.float64))
    expected_bias = cotangent.astype(np.float64).sum(axis=(0, 1))
    expected_inputs = cotangent.astype(np.float64) @ kernel.T
    for batched in (False, True):
        if batched:  # per-client gradients under vmap, summed
            grads, input_grads = jax.vmap(lambda xc, cc: gradients(ours, xc, cc))(x, cotangent)
            grads = jax.tree.map(lambda g: np.asarray(g).sum(axis=0), grads)
        else:  # a 3-D input through one layer
            grads, input_grads = jax.jit(lambda xs, cts: gradients(ours, xs, cts))(x, cotangent)
        np.testing.assert_allclose(grads["params"]["kernel"], expected_kernel, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grads["params"]["bias"], expected_bias, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(input_grads, expected_inputs, rtol=1e-5, atol=1e-5)


def test_max_pool_equals_flax_max_pool():
    x = np.random.default_rng(1).normal(size=(2, 6, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


def test_cnn_lowerings_agree_on_outputs_and_gradients(digits_cnn):
    params = digits_cnn.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    x = jnp.asarray(np.random.default_rng(2).random((4, 8, 8, 1)), jnp.float32)
    y = jnp.array([1, 2, 3, 4])

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(digits_cnn.apply(p, x, None, False), y).mean()

    results = {}
    for lowering in ("lax", "patches"):
        with conv_lowering(lowering):
            results[lowering] = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(results["lax"][0], results["patches"][0], atol=1e-6)
    for a, b in zip(jax.tree.leaves(results["lax"][1]), jax.tree.leaves(results["patches"][1])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_unknown_model_and_bad_classes():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        get_model("resnet", 10)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("cnn", 1)


def test_nnx_module_and_pure_functions_train_identically(logreg_params):
    """The same linear model as nnx, as pure functions and as linen agree."""
    from flax import nnx

    module = nnx.Linear(NUM_FEATURES, NUM_CLASSES, rngs=nnx.Rngs(0))
    dense = logreg_params["Dense_0"]
    module.kernel[...] = dense["kernel"]
    module.bias[...] = dense["bias"]
    nnx_model = from_nnx(module)

    def apply(params, x, rng, train):
        return x @ params["w"] + params["b"]

    pure_model = from_functions(lambda rng, x: None, apply)
    clients = make_clients([5, 11], seed=9)
    cohort = pack_cohort(clients, [0, 1], PackingConfig(batch_size=4), seed=0, round_index=0, num_total_clients=2)
    results = []
    for model, params in (
        (nnx_model, nnx_model.init(None, None)),
        (pure_model, {"w": dense["kernel"], "b": dense["bias"]}),
    ):
        algorithm = fed_avg(classification_loss(model), optax.sgd(0.1))
        state, _ = build_round(algorithm, ExecutionPlan())(algorithm.init(params), cohort, jax.random.key(0))
        results.append(state.params)
    nnx_params, pure_params = results
    np.testing.assert_allclose(np.asarray(nnx_params["kernel"][...]), pure_params["w"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(nnx_params["bias"][...]), pure_params["b"], atol=1e-6)
    moved = np.abs(np.asarray(pure_params["w"]) - np.asarray(dense["kernel"])).max()
    assert moved > 1e-3  # training really happened


def test_uint8_pixels_are_scaled_like_float_pixels(digits_cnn):
    params = digits_cnn.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    pixels = np.random.default_rng(3).integers(0, 256, size=(2, 8, 8, 1)).astype(np.uint8)
    as_float = pixels.astype(np.float32) / 255.0
    np.testing.assert_allclose(
        digits_cnn.apply(params, pixels, None, False), digits_cnn.apply(params, as_float, None, False), atol=1e-6
    )
