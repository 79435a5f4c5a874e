import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.models import (
    LOWERINGS,
    EmnistCnn,
    classification_loss,
    conv2d_valid,
    count_params,
    default_lowering,
    from_functions,
    from_linen,
    from_nnx,
    get_model,
    max_pool_2x2,
)
from fedjaxsim.models.dense import Dense, affine
from fedjaxsim.testing import synthetic_clients


def test_emnist_cnn_has_the_published_parameter_count():
    model = get_model("cnn", 62)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert count_params(shapes) == 1_206_590  # Reddi et al. 2020, Table 3


@pytest.mark.parametrize(
    "name, expected",
    [("dense", 784 * 200 + 200 + 200 * 200 + 200 + 200 * 62 + 62), ("logreg", 784 * 62 + 62)],
)
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
        for i in range(3)
        for j in range(3)
        for c in range(4)
    )
    np.testing.assert_allclose(via_patches[1, 2, 3, 5], expected, atol=1e-5)


@pytest.mark.parametrize(
    "in_features, out_features",
    [(7, 3), (40, 2), (3, 40)],
    ids=["either-transpose", "transposes-the-gradient", "transposes-the-inputs"],
)
@pytest.mark.parametrize("cpu_gradients", [True, False], ids=["cpu-form", "plain"])
def test_dense_layer_matches_flax_dense_and_a_float64_gradient(
    in_features, out_features, cpu_gradients
):
    """The CPU form (weight and bias gradients from one plain dot over a
    materialised transpose of whichever of x and g is cheaper) computes the
    same layer: same parameters as flax.linen.Dense, same outputs, and input,
    weight and bias gradients equal to the closed form in float64, with and
    without vmap over clients and for inputs with extra leading axes. The
    shapes make the size rule take each transpose."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, in_features)).astype(np.float32)  # [clients, batch, features]
    cotangent = rng.normal(size=(2, 5, out_features)).astype(np.float32)
    ours, theirs = Dense(out_features, cpu_gradients=cpu_gradients), nn.Dense(out_features)
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


def test_affine_without_bias_has_float64_gradients():
    """The bias-free form (a convolution's patches without bias) in both transposes."""
    rng = np.random.default_rng(5)
    for rows, in_features, out_features in ((6, 9, 2), (6, 2, 9)):
        x = rng.normal(size=(rows, in_features)).astype(np.float32)
        w = rng.normal(size=(in_features, out_features)).astype(np.float32)
        g = rng.normal(size=(rows, out_features)).astype(np.float32)
        grad_x, grad_w = jax.grad(
            lambda x, w, g: jnp.sum(affine(x, w, None, cpu_gradients=True) * g), argnums=(0, 1)
        )(x, w, g)
        np.testing.assert_allclose(grad_w, x.astype(np.float64).T @ g, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grad_x, g.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)


def test_max_pool_equals_flax_max_pool():
    x = np.random.default_rng(1).normal(size=(2, 6, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


class _FlaxCnn(nn.Module):
    """The EMNIST CNN written with flax's own layers: an independent reference."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(self.num_classes)(x)


def test_cnn_lowerings_agree_with_flax_on_outputs_and_gradients():
    """Every lowering and gradient form, chosen when the model is built, is
    the same function of the same parameters as the CNN in flax's layers."""
    x = jnp.asarray(np.random.default_rng(2).random((4, 8, 8, 1)), jnp.float32)
    y = jnp.array([1, 2, 3, 4])
    reference = from_linen(_FlaxCnn(10))
    params = reference.init(jax.random.key(0), x)
    # Non-zero biases, so that the bias paths count.
    params = jax.tree.map(lambda p: p + 0.01, params)

    def loss_and_grads(model):
        def loss(p):
            logits = model.apply(p, x, None, False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return jax.jit(jax.value_and_grad(loss))(params)

    expected_loss, expected_grads = loss_and_grads(reference)
    models = {  # get_model on CPU: patches with the CPU gradient form; lax without
        "get_model patches": get_model("cnn", 10, lowering="patches", backend="cpu"),
        "get_model lax": get_model("cnn", 10, lowering="lax", backend="cpu"),
        "patches, plain gradients": from_linen(
            EmnistCnn(10, lowering="patches", cpu_gradients=False)
        ),
        "lax, cpu gradients": from_linen(EmnistCnn(10, lowering="lax", cpu_gradients=True)),
        # oneDNN where it loads (tests/models/test_conv_onednn.py), else patches.
        "get_model onednn": get_model("cnn", 10, lowering="onednn", backend="cpu"),
    }
    assert set(LOWERINGS) == {"patches", "lax", "onednn"}
    for name, model in models.items():
        assert jax.tree.structure(model.init(jax.random.key(0), x)) == jax.tree.structure(params), (
            name
        )
        loss, grads = loss_and_grads(model)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=name)


def _uses_cpu_gradients(model, inputs):
    """Whether the model's gradient has the CPU form's optimization barriers."""
    params = jax.eval_shape(model.init, jax.random.key(0), inputs)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    loss = lambda p: jnp.sum(model.apply(p, inputs, None, False))  # noqa: E731
    return "optimization_barrier" in str(jax.make_jaxpr(jax.grad(loss))(params))


def test_get_model_chooses_the_gradient_form_at_build_time():
    """No global: the backend given to get_model decides; patches on CPU take
    the CPU gradient form, every other combination the plain one."""
    features, images = jnp.zeros((2, 12)), jnp.zeros((2, 8, 8, 1))
    from fedjaxsim.models import conv_onednn

    assert default_lowering("gpu") == "patches"
    assert default_lowering("cpu") == ("onednn" if conv_onednn.available() else "patches")
    assert _uses_cpu_gradients(get_model("logreg", 5, backend="cpu"), features)
    assert not _uses_cpu_gradients(get_model("logreg", 5, backend="gpu"), features)
    assert _uses_cpu_gradients(get_model("cnn", 10, lowering="patches", backend="cpu"), images)
    assert not _uses_cpu_gradients(get_model("cnn", 10, lowering="lax", backend="cpu"), images)
    assert not _uses_cpu_gradients(get_model("cnn", 10, backend="gpu"), images)
    # The dense layers keep their CPU gradients under every CPU default lowering.
    for lowering in ("patches", "onednn"):
        assert _uses_cpu_gradients(
            get_model("dense", 5, lowering=lowering, backend="cpu"), features
        )


def test_unknown_model_lowering_and_bad_classes():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        get_model("resnet", 10)
    with pytest.raises(ValueError, match="unknown lowering 'fft'"):
        get_model("cnn", 10, lowering="fft")
    with pytest.raises(ValueError, match="num_classes"):
        get_model("cnn", 1)
    with pytest.raises(ValueError, match="unknown conv lowering 'fft'"):
        conv2d_valid(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)), "fft")


def test_nnx_module_and_pure_functions_train_identically(logreg_params):
    """The same linear model as nnx, as pure functions and as linen agree."""
    from flax import nnx

    dense = logreg_params["Dense_0"]
    num_features, num_classes = dense["kernel"].shape
    module = nnx.Linear(num_features, num_classes, rngs=nnx.Rngs(0))
    module.kernel[...] = dense["kernel"]
    module.bias[...] = dense["bias"]
    nnx_model = from_nnx(module)

    def apply(params, x, rng, train):
        return x @ params["w"] + params["b"]

    pure_model = from_functions(lambda rng, x: None, apply)
    clients = synthetic_clients([5, 11], seed=9, num_features=num_features, num_classes=num_classes)
    cohort = pack_cohort(
        clients, [0, 1], PackingConfig(batch_size=4), seed=0, round_index=0, num_total_clients=2
    )
    results = []
    for model, params in (
        (nnx_model, nnx_model.init(None, None)),
        (pure_model, {"w": dense["kernel"], "b": dense["bias"]}),
    ):
        algorithm = fed_avg(classification_loss(model), optax.sgd(0.1))
        state, _ = build_round(algorithm, ExecutionPlan())(
            algorithm.init(params), cohort, jax.random.key(0)
        )
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
        digits_cnn.apply(params, pixels, None, False),
        digits_cnn.apply(params, as_float, None, False),
        atol=1e-6,
    )


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
def test_packed_dropout_keeps_each_element_independently_with_the_right_rate(rate):
    """Bernoulli(1 - rate) keeps, scaled by 1 / (1 - rate): the mean, and the
    co-occurrence of neighbours that share a random word, match independence."""
    from fedjaxsim.models.zoo import PackedDropout

    inputs = jnp.ones((64, 100, 50))  # 320,000 elements
    outputs = PackedDropout(rate).apply({}, inputs, rngs={"dropout": jax.random.key(3)})
    keep = np.asarray(outputs != 0).reshape(-1)
    np.testing.assert_allclose(np.unique(np.asarray(outputs)), [0.0, 1 / (1 - rate)], rtol=1e-6)
    p, n = 1 - rate, keep.size
    assert abs(keep.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    for lag in (1, 2, 15, 16, 31, 32):  # fields of one word, and of the next
        joint = np.mean(keep[:-lag] & keep[lag:])
        assert abs(joint - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / n), lag
    other_key = PackedDropout(rate).apply({}, inputs, rngs={"dropout": jax.random.key(4)})
    assert not np.array_equal(outputs, other_key)


def test_packed_dropout_passes_through_and_falls_back():
    from fedjaxsim.models.zoo import EmnistCnn, PackedDropout

    inputs = jnp.arange(1.0, 301.0).reshape(3, 100)
    same = PackedDropout(0.5, deterministic=True).apply({}, inputs)
    np.testing.assert_array_equal(same, inputs)
    # A rate that is not a multiple of 1/256 uses nn.Dropout: 0.3 still drops 30%.
    big = jnp.ones((400, 500))
    odd_rate = PackedDropout(0.3).apply({}, big, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_allclose(np.unique(np.asarray(odd_rate)), [0.0, 1 / 0.7], rtol=1e-6)
    assert abs(float(jnp.mean(odd_rate == 0)) - 0.3) < 0.005
    # The default (patches) CNN keeps flax's dropout draws; the oneDNN form packs them.
    assert EmnistCnn(lowering="patches").dropout is nn.Dropout
    assert EmnistCnn(lowering="onednn").dropout is PackedDropout
    assert EmnistCnn(lowering="patches", packed_dropout=True).dropout is PackedDropout
