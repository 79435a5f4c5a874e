"""The benchmark models of Reddi et al. 2021: parameter counts, references and
behaviour, on tiny configurations except for the (abstract) counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxsim.models import (
    MODEL_NAMES,
    BagOfWordsLogReg,
    CausalTransformer,
    CharLstm,
    ResNet18,
    WordLstm,
    count_params,
    from_linen,
    get_model,
)
from fedjaxsim.models.resnet import per_image_standardization
from fedjaxsim.models.sequence import bag_of_words

KEY = jax.random.key(0)
IDS = jnp.zeros((1, 8), jnp.int32)
IMAGES = jnp.zeros((1, 32, 32, 3), jnp.float32)


def jitted(module):
    """``from_linen(module)`` with a jitted apply: one compilation per shape
    instead of op-by-op dispatch, which keeps these tests fast."""
    model = from_linen(module)
    return model._replace(apply=jax.jit(model.apply, static_argnums=3))


def host_params(model, sample, seed=0):
    """Random params of the shapes ``model.init`` gives, drawn on the host
    (normal, std 0.3): no initialiser is compiled, which keeps these tests
    fast. Biases are non-zero, so they are exercised too."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, KEY, sample)
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def abstract_count(module, sample):
    """Parameter count from shapes only: nothing is allocated."""
    return count_params(jax.eval_shape(module.init, KEY, sample))


def lstm_count(inputs, hidden):
    """Keras' LSTM: kernel [in, 4h], recurrent kernel [h, 4h], bias [4h]."""
    return 4 * hidden * (inputs + hidden + 1)


def resnet18_gn_count(num_classes):
    """CIFAR ResNet-18, bias-free convolutions each followed by a GroupNorm
    (scale and bias per channel), average pool, dense."""
    conv = lambda k, cin, cout: k * k * cin * cout  # noqa: E731
    norm = lambda c: 2 * c  # noqa: E731
    total = conv(3, 3, 64) + norm(64)  # stem
    cin = 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            total += conv(3, cin, width) + norm(width) + conv(3, width, width) + norm(width)
            if cin != width:  # projection shortcut, first block of stages 2-4
                total += conv(1, cin, width) + norm(width)
            cin = width
    return total + 512 * num_classes + num_classes


def tff_resnet18_gn_count(num_classes):
    """Reddi et al.'s ResNet-18 v2 (google-research/federated
    utils/models/resnet_models.py): 7x7 stem, pre-activation blocks whose
    first norm sees the block's input channels (none before the very first
    block), one norm after the last block, 1x1 projection shortcuts."""
    conv = lambda k, cin, cout: k * k * cin * cout  # noqa: E731
    norm = lambda c: 2 * c  # noqa: E731
    total = conv(7, 3, 64) + norm(64)  # stem
    cin = 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            first_norm = 0 if (width == 64 and block == 0) else norm(cin)
            total += first_norm + conv(3, cin, width) + norm(width) + conv(3, width, width)
            if cin != width:
                total += conv(1, cin, width) + norm(width)
            cin = width
    return total + norm(512) + 512 * num_classes + num_classes


def transformer_count(vocab, max_length, num_layers, hidden, mlp):
    """Token and position embeddings; per block two LayerNorms (scale, bias),
    query/key/value/output projections with biases and a two-layer MLP; a
    final LayerNorm and the output layer."""
    block = 2 * 2 * hidden + 4 * (hidden * hidden + hidden) + 2 * hidden * mlp + mlp + hidden
    embeddings = vocab * hidden + max_length * hidden
    return embeddings + num_layers * block + 2 * hidden + hidden * vocab + vocab


def test_parameter_counts():
    # Shakespeare (TFF char_prediction_models): 86 characters + pad, oov, bos,
    # eos = 90 ids; embedding 8; two LSTMs of 256; dense 90. Closed form:
    # 820,522. (McMahan et al. 2017 report 866,578 for a model described the
    # same way; that number is not reproduced by Keras' or flax's LSTM.)
    char = 90 * 8 + lstm_count(8, 256) + lstm_count(256, 256) + 256 * 90 + 90
    assert char == 820_522
    assert abstract_count(CharLstm(), IDS) == char
    # Stack Overflow next word: Reddi et al. 2021, Table 3 / TFF: 4,050,748.
    word = 10004 * 96 + lstm_count(96, 670) + 670 * 96 + 96 + 96 * 10004 + 10004
    assert word == 4_050_748
    assert abstract_count(WordLstm(), IDS) == 4_050_748
    # Stack Overflow tag prediction: Reddi et al. 2021, Table 3 / TFF: 5,000,500.
    assert abstract_count(BagOfWordsLogReg(), IDS) == 10000 * 500 + 500 == 5_000_500
    # CIFAR-100 ResNet-18 with GroupNorm: the closed form, 11,220,132 (the same
    # as with BatchNorm's scale and bias; no published count for this layout
    # was found). Reddi et al.'s code builds an ImageNet-stem ResNet v2 with
    # 7,680 more parameters: 11,227,812, the count torchvision's resnet18 has
    # with a 100-class head (11,689,512 - 1000 * 513 + 100 * 513).
    assert resnet18_gn_count(100) == 11_220_132
    assert abstract_count(ResNet18(), IMAGES) == 11_220_132
    assert tff_resnet18_gn_count(100) == 11_689_512 - 1000 * 513 + 100 * 513 == 11_227_812
    assert tff_resnet18_gn_count(100) - resnet18_gn_count(100) == (7 * 7 - 3 * 3) * 3 * 64
    # The causal transformer (not in Reddi et al.; no published count): the
    # closed form, 2,291,060 with the Stack Overflow vocabulary.
    count = transformer_count(10004, 256, 3, 96, 4 * 96)
    assert count == 2_291_060
    assert abstract_count(CausalTransformer(vocab_size=10004), IDS) == count
    assert abstract_count(CausalTransformer(vocab_size=90), IDS) == 377_658


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _numpy_lstm(x, cell):
    """The LSTM equations in float64, with flax's weight names."""
    w = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in cell.items()}
    batch, steps, _ = x.shape
    hidden = w["hi"]["kernel"].shape[0]
    c = np.zeros((batch, hidden))
    h = np.zeros((batch, hidden))
    outputs = []
    for t in range(steps):
        gate = {
            g: x[:, t] @ w[f"i{g}"]["kernel"] + h @ w[f"h{g}"]["kernel"] + w[f"h{g}"]["bias"]
            for g in "ifgo"
        }
        c = _sigmoid(gate["f"]) * c + _sigmoid(gate["i"]) * np.tanh(gate["g"])
        h = _sigmoid(gate["o"]) * np.tanh(c)
        outputs.append(h)
    return np.stack(outputs, axis=1)


def test_char_lstm_matches_numpy_loop():
    model = jitted(CharLstm(vocab_size=7, embedding=3, hidden=5, num_layers=2, unroll=4))
    ids = np.random.default_rng(0).integers(0, 7, (2, 6)).astype(np.uint16)
    params = host_params(model, jnp.asarray(ids))
    logits = model.apply(params, jnp.asarray(ids), None, False)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 6, 7)

    h = np.asarray(params["embed"]["embedding"], np.float64)[ids.astype(np.int64)]
    for layer in range(2):
        h = _numpy_lstm(h, params[f"lstm{layer}"])
    dense = params["logits"]
    expected = h @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=1e-5)


def test_bag_of_words_matches_one_hot_mean():
    vocab = 6
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab + 2, (5, 9))  # 0 pad, 1..6 words, 7 oov
    ids[0] = 0  # an all-padding example: zeros
    features = np.asarray(bag_of_words(jnp.asarray(ids, jnp.uint16), vocab))
    for row, example in zip(features, ids):
        tokens = example[example > 0] - 1  # TFF's ids: words 0..V-1, oov V
        if tokens.size == 0:
            np.testing.assert_array_equal(row, 0.0)
            continue
        reference = np.eye(vocab + 1)[tokens].mean(axis=0)[:vocab]
        np.testing.assert_allclose(row, reference, rtol=1e-6)
    model = jitted(BagOfWordsLogReg(vocab_size=vocab, num_classes=3))
    params = host_params(model, jnp.asarray(ids))
    logits = model.apply(params, jnp.asarray(ids), None, False)
    expected = features @ np.asarray(params["logits"]["kernel"]) + np.asarray(
        params["logits"]["bias"]
    )
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-6)


TINY_TRANSFORMER = dict(vocab_size=11, max_length=8, num_layers=2, hidden=16, heads=2)


def test_transformer_is_causal():
    model = jitted(CausalTransformer(**TINY_TRANSFORMER))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 11, (2, 8)))
    params = host_params(model, ids)
    logits = model.apply(params, ids, None, False)
    assert logits.shape == (2, 8, 11) and logits.dtype == jnp.float32
    t = 5
    changed = model.apply(params, ids.at[:, t].set((ids[:, t] + 1) % 11), None, False)
    np.testing.assert_array_equal(np.asarray(changed[:, :t]), np.asarray(logits[:, :t]))
    assert not np.allclose(np.asarray(changed[:, t:]), np.asarray(logits[:, t:]))


def test_transformer_rejects_long_sequences():
    model = from_linen(CausalTransformer(**TINY_TRANSFORMER))
    params = jax.eval_shape(model.init, KEY, jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"(?s)length 9.*max_length 8.*max_length="):
        jax.eval_shape(
            lambda p, x: model.apply(p, x, None, False), params, jnp.zeros((1, 9), jnp.int32)
        )


def test_transformer_dropout_only_with_rng():
    model = jitted(CausalTransformer(**TINY_TRANSFORMER, dropout=0.5))
    ids = jnp.ones((1, 8), jnp.int32)
    params = host_params(model, ids)
    eval_logits = model.apply(params, ids, None, False)
    np.testing.assert_array_equal(model.apply(params, ids, None, True), eval_logits)
    train = model.apply(params, ids, jax.random.key(3), True)
    assert not np.allclose(np.asarray(train), np.asarray(eval_logits))


TINY_RESNET = dict(num_classes=3, crop=6, groups=2, widths=(2, 4), blocks=(1, 1))


def test_resnet_augmentation():
    module = ResNet18(**TINY_RESNET)
    model = jitted(module)
    images = jax.random.uniform(jax.random.key(4), (3, 8, 8, 3))
    params = host_params(model, images)
    a = model.apply(params, images, jax.random.key(5), True)
    np.testing.assert_array_equal(a, model.apply(params, images, jax.random.key(5), True))
    b = model.apply(params, images, jax.random.key(6), True)
    assert not np.allclose(np.asarray(a), np.asarray(b))

    # The preprocessing alone (cheap to trace: no convolutions). Evaluation,
    # and training without an RNG, take the central crop: slicing by hand.
    def preprocess(x, train, rng=None):
        rngs = None if rng is None else {"dropout": rng}
        return module.apply({}, x, train, method=ResNet18.preprocess, rngs=rngs)

    # TFF standardises 0..255 pixels.
    by_hand = np.asarray(per_image_standardization(255.0 * images[:, 1:7, 1:7, :]))
    close = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(preprocess(images, False), by_hand, **close)
    np.testing.assert_allclose(preprocess(images, True), by_hand, **close)
    np.testing.assert_allclose(preprocess(images, False, jax.random.key(5)), by_hand, **close)
    crops = preprocess(images, True, jax.random.key(5))
    assert crops.shape == (3, 6, 6, 3)
    # Each training crop is one of the 3x3 windows, possibly mirrored.
    for image, crop in zip(np.asarray(images), np.asarray(crops)):
        windows = [image[i : i + 6, j : j + 6] for i in range(3) for j in range(3)]
        windows = [(w - w.mean()) / w.std() for w in windows + [w[:, ::-1] for w in windows]]
        assert any(np.allclose(crop, w, atol=1e-4) for w in windows)
    # The std floor, 1/sqrt(6*6*3), applies to 0..255 pixels: an image that
    # varies by about 1/255 is still standardised to unit std.
    faint = 0.5 + 0.004 * np.random.default_rng(10).standard_normal((1, 8, 8, 3))
    assert np.std(preprocess(jnp.asarray(faint, jnp.float32), False)) == pytest.approx(1, rel=1e-3)
    # uint8 pixels and the same pixels as floats in [0, 1] agree.
    pixels = (np.asarray(images) * 255).astype(np.uint8)
    np.testing.assert_allclose(
        preprocess(jnp.asarray(pixels), False),
        preprocess(jnp.asarray(pixels, jnp.float32) / 255.0, False),
        rtol=1e-5,
        atol=1e-5,
    )


def test_per_image_standardization():
    x = np.random.default_rng(7).uniform(size=(2, 4, 4, 3))
    x[1] = 0.25  # constant: std clamped to 1/sqrt(48), output zeros
    out = np.asarray(per_image_standardization(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(out[0], (x[0] - x[0].mean()) / x[0].std(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[1], 0.0, atol=1e-6)


TINY = {
    "char_lstm": (CharLstm(vocab_size=7, embedding=3, hidden=4), (3, 5), 7),
    "word_lstm": (WordLstm(vocab_size=9, embedding=3, hidden=4, projection=3), (3, 5), 9),
    "transformer": (CausalTransformer(**TINY_TRANSFORMER), (3, 5), 11),
    "tag_logreg": (BagOfWordsLogReg(vocab_size=6, num_classes=4), (3, 5), 8),
    "resnet18": (ResNet18(**TINY_RESNET), (3, 8, 8, 3), None),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_vmap_over_clients(name):
    module, shape, high = TINY[name]
    model = jitted(module)
    clients = 2
    if high is None:
        inputs = jax.random.uniform(jax.random.key(8), (clients, *shape))
    else:
        inputs = jax.random.randint(jax.random.key(8), (clients, *shape), 0, high)
    params = jax.tree.map(
        lambda *a: np.stack(a), *(host_params(model, inputs[0], seed) for seed in range(clients))
    )
    rngs = jax.random.split(jax.random.key(9), clients)
    out = jax.jit(jax.vmap(lambda p, x, r: model.apply(p, x, r, True)))(params, inputs, rngs)
    for c in range(clients):
        one = model.apply(jax.tree.map(lambda a: a[c], params), inputs[c], rngs[c], True)
        np.testing.assert_allclose(np.asarray(out[c]), np.asarray(one), rtol=1e-5, atol=1e-5)
    assert out.dtype == jnp.float32


def test_get_model_builds_the_new_names():
    assert MODEL_NAMES[:3] == ("cnn", "dense", "logreg")
    transformer = transformer_count(10004, 256, 3, 96, 4 * 96)
    cases = {  # name: (num_classes, sample inputs, parameter count)
        "char_lstm": (90, IDS, 820_522),
        "word_lstm": (10004, IDS, 4_050_748),
        "transformer": (10004, IDS, transformer),
        "tag_logreg": (500, IDS, 5_000_500),
        "resnet18": (100, IMAGES, 11_220_132),
    }
    for name, (classes, sample, count) in cases.items():
        assert name in MODEL_NAMES
        model = get_model(name, classes)
        assert count_params(jax.eval_shape(model.init, KEY, sample)) == count
    small = get_model("tag_logreg", 3, vocab_size=5)
    assert count_params(jax.eval_shape(small.init, KEY, IDS)) == 5 * 3 + 3
