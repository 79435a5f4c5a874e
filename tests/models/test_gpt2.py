"""GPT-2 (Radford et al. 2019) against Hugging Face transformers and float64 NumPy.

The fixture ``tests/fixtures/tiny_gpt2`` is a tiny random ``GPT2LMHeadModel``
saved by transformers, with logits and a greedy generation that transformers
computed (``scripts/make_tiny_gpt2.py``), so the loader and the forward pass
are checked against code we did not write. A float64 NumPy forward pass in
this file is a second, loop-free reference for LoRA's merged-kernel identity
(Hu et al. 2021).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxsim.models import (
    GPT2,
    GPT2Config,
    LoraConfig,
    PretrainedLM,
    generate,
    init_gpt2,
    load_gpt2,
    merge_params,
)
from fedjaxsim.models.gpt2 import read_gpt2_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_gpt2"
INPUTS = ("full", "batch", "short")


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    # The references are float32 (transformers on CPU) and float64; on GPUs
    # JAX's default float32 matmul may use TF32, so the comparisons pin full
    # precision. On CPU this changes nothing.
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE / "reference_logits.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def tiny() -> PretrainedLM:
    return load_gpt2(FIXTURE)


def jit_logits(lm: PretrainedLM):
    return jax.jit(lambda params, tokens: lm.model.apply(params, tokens, None, False))


def copy_fixture(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(FIXTURE, directory)
    return directory


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(t) for name, t in tensors.items()}, str(path))


# --- float64 NumPy reference --------------------------------------------------


def numpy_gpt2(params, tokens: np.ndarray, config: GPT2Config, lora_scale: float = 1.0):
    """GPT-2's forward pass in float64 NumPy, with LoRA merged into the kernels.

    Written from Radford et al. 2019 and transformers' GPT2 modelling code,
    not from fedjaxsim: per-head loops, exact softmax, tanh GELU. A projection
    with adapters uses ``kernel + lora_scale * lora_a @ lora_b``.
    """
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    eps = config.layer_norm_epsilon

    def layer_norm(x, ln):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * ln["scale"] + ln["bias"]

    def projection(x, proj):
        kernel = proj["kernel"]
        if "lora_a" in proj:
            kernel = kernel + lora_scale * proj["lora_a"] @ proj["lora_b"]
        return x @ kernel + proj["bias"]

    def gelu(x):
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))

    batch, length = tokens.shape
    heads = config.n_head
    head_dim = config.n_embd // heads
    h = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][np.arange(length)]
    for layer in range(config.n_layer):
        block = p[f"h_{layer}"]
        x = layer_norm(h, block["ln_1"])
        q, k, v = np.split(projection(x, block["attn"]["c_attn"]), 3, axis=-1)
        out = np.zeros_like(x)
        for head in range(heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            scores = q[..., cols] @ np.swapaxes(k[..., cols], -1, -2) / np.sqrt(head_dim)
            scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            out[..., cols] = weights @ v[..., cols]
        h = h + projection(out, block["attn"]["c_proj"])
        x = layer_norm(h, block["ln_2"])
        h = h + projection(gelu(projection(x, block["mlp"]["c_fc"])), block["mlp"]["c_proj"])
    h = layer_norm(h, p["ln_f"])
    return h @ p["wte"]["embedding"].T


def assert_logits_close(actual, expected, rtol=1e-5):
    """Within ``rtol`` of the logits' scale, everywhere."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


# --- the loader against transformers ------------------------------------------


def test_fixture_is_small_and_self_consistent(reference):
    total = sum(path.stat().st_size for path in FIXTURE.iterdir())
    assert total < 1_000_000
    config = read_gpt2_config(FIXTURE)
    assert (config.vocab_size, config.n_positions, config.n_embd) == (384, 64, 32)
    assert (config.n_layer, config.n_head) == (2, 4)
    assert reference["tokens_full"].shape == (1, config.n_positions)
    assert reference["tokens_batch"].shape[0] == 2
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == config.vocab_size
    assert tokenizer.token_to_id("<|endoftext|>") is not None


@pytest.mark.parametrize("name", INPUTS)
def test_logits_match_transformers(tiny, reference, name):
    tokens = reference[f"tokens_{name}"]
    logits = jit_logits(tiny)(merge_params(tiny.base, tiny.adapters), tokens)
    assert logits.dtype == jnp.float32
    assert_logits_close(logits, reference[f"logits_{name}"])


def test_numpy_reference_matches_transformers(tiny, reference):
    # The float64 reference used for LoRA below is itself checked here.
    logits = numpy_gpt2(tiny.base, reference["tokens_batch"], tiny.config)
    assert_logits_close(logits, reference["logits_batch"])


def test_greedy_generation_matches_transformers(tiny, reference):
    prompt = reference["generate_prompt"]
    expected = reference["generate_tokens"]
    tokens = generate(tiny, tiny.base, prompt, expected.shape[1] - prompt.shape[1], greedy=True)
    assert tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tokens), expected)


def test_checkpoint_without_prefix_with_buffers_and_tied_head_loads(tiny, reference, tmp_path):
    # GPT2Model saves names without "transformer."; older checkpoints carry
    # the causal-mask buffers and an explicit (tied) lm_head.weight.
    directory = copy_fixture(tmp_path)
    tensors = read_tensors(directory / "model.safetensors")
    renamed = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    renamed["lm_head.weight"] = renamed["wte.weight"].copy()
    renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    renamed["h.1.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    write_tensors(directory / "model.safetensors", renamed)
    lm = load_gpt2(directory)
    assert jax.tree.all(jax.tree.map(np.array_equal, lm.base, tiny.base))


def test_bfloat16_checkpoint_loads_as_float32(tiny, tmp_path):
    safetensors_flax = pytest.importorskip("safetensors.flax")
    directory = copy_fixture(tmp_path)
    tensors = read_tensors(directory / "model.safetensors")
    safetensors_flax.save_file(
        {name: jnp.asarray(t, jnp.bfloat16) for name, t in tensors.items()},
        str(directory / "model.safetensors"),
    )
    lm = load_gpt2(directory)
    rounded = jax.tree.map(
        lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32), tiny.base
    )
    for got, want in zip(jax.tree.leaves(lm.base), jax.tree.leaves(rounded)):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), want)


def test_init_gpt2_has_the_loaded_structure(tiny):
    lm = init_gpt2(tiny.config)
    assert lm.adapters == {}
    assert jax.tree.structure(lm.base) == jax.tree.structure(tiny.base)
    assert jax.tree.map(jnp.shape, lm.base) == jax.tree.map(jnp.shape, tiny.base)
    # GPT-2's init: LayerNorms at 1 and 0, biases 0.
    np.testing.assert_array_equal(lm.base["h_0"]["ln_1"]["scale"], 1.0)
    np.testing.assert_array_equal(lm.base["h_0"]["attn"]["c_attn"]["bias"], 0.0)


def test_dropout_only_when_training_with_an_rng(tiny, reference):
    tokens = reference["tokens_short"]
    rng = jax.random.key(1)
    eval_logits = tiny.model.apply(tiny.base, tokens, rng, False)
    no_rng = tiny.model.apply(tiny.base, tokens, None, True)
    train_logits = tiny.model.apply(tiny.base, tokens, rng, True)
    np.testing.assert_array_equal(eval_logits, no_rng)
    assert not np.allclose(eval_logits, train_logits)


# --- LoRA on the loaded model ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lora() -> PretrainedLM:
    return load_gpt2(FIXTURE, LoraConfig(rank=2, alpha=4.0), rng=jax.random.key(3))


def test_lora_with_zero_b_equals_the_base_model_bitwise(tiny, tiny_lora, reference):
    assert tiny_lora.base.keys() == tiny.base.keys()
    assert jax.tree.all(jax.tree.map(np.array_equal, tiny_lora.base, tiny.base))
    for path, leaf in jax.tree_util.tree_leaves_with_path(tiny_lora.adapters):
        if path[-1].key == "lora_b":
            np.testing.assert_array_equal(leaf, 0.0)
        else:
            assert np.abs(np.asarray(leaf)).max() > 0  # A is random
    tokens = reference["tokens_batch"]
    # Op by op, the two forward passes share every floating-point operation
    # but the exact "+ 0" of the update. (Under jit XLA may fuse the bias add
    # differently, a difference of about one ulp.)
    base = tiny.model.apply(tiny.base, tokens, None, False)
    adapted = tiny_lora.model.apply(
        merge_params(tiny_lora.base, tiny_lora.adapters), tokens, None, False
    )
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))
    jitted = jit_logits(tiny_lora)(merge_params(tiny_lora.base, tiny_lora.adapters), tokens)
    assert_logits_close(jitted, base, rtol=1e-6)


def test_lora_with_nonzero_b_equals_merged_kernels_in_float64(tiny_lora, reference):
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(
        lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32), tiny_lora.adapters
    )
    params = merge_params(tiny_lora.base, adapters)
    tokens = reference["tokens_full"]
    logits = jit_logits(tiny_lora)(params, tokens)
    expected = numpy_gpt2(params, tokens, tiny_lora.config, lora_scale=4.0 / 2)
    base_logits = numpy_gpt2(tiny_lora.base, tokens, tiny_lora.config)
    assert np.abs(expected - base_logits).max() > 0.1  # the adapters matter
    assert_logits_close(logits, expected, rtol=2e-5)


def test_vmapped_adapters_with_a_shared_base_match_a_loop(tiny_lora, reference):
    # The federated layout: one base (in_axes=None), adapters stacked on the
    # client axis.
    num_clients = 3
    rng = np.random.default_rng(1)
    stacked = jax.tree.map(
        lambda a: jnp.asarray(0.1 * rng.standard_normal((num_clients, *a.shape)), jnp.float32),
        tiny_lora.adapters,
    )
    tokens = reference["tokens_batch"]

    def client_logits(base, adapters):
        return tiny_lora.model.apply(merge_params(base, adapters), tokens, None, False)

    batched = jax.jit(jax.vmap(client_logits, in_axes=(None, 0)))(tiny_lora.base, stacked)
    assert batched.shape == (num_clients, *tokens.shape, tiny_lora.config.vocab_size)
    for client in range(num_clients):
        one = jax.tree.map(lambda a: np.asarray(a[client], np.float64), stacked)
        expected = numpy_gpt2(merge_params(tiny_lora.base, one), tokens, tiny_lora.config, 2.0)
        assert_logits_close(batched[client], expected, rtol=2e-5)


# --- generation -----------------------------------------------------------------


def test_sampling_is_deterministic_per_rng_and_top_k_1_is_greedy(tiny, reference):
    prompt = np.concatenate([reference["generate_prompt"]] * 2)

    def sample(rng, **kw):
        return np.asarray(generate(tiny, tiny.base, prompt, 12, rng=rng, **kw))

    first = sample(jax.random.key(0), temperature=1.5)
    np.testing.assert_array_equal(first, sample(jax.random.key(0), temperature=1.5))
    assert not np.array_equal(first, sample(jax.random.key(1), temperature=1.5))
    np.testing.assert_array_equal(first[:, : prompt.shape[1]], prompt)
    assert first.min() >= 0 and first.max() < tiny.config.vocab_size
    greedy = np.asarray(generate(tiny, tiny.base, prompt, 12, greedy=True))
    np.testing.assert_array_equal(sample(jax.random.key(5), top_k=1), greedy)


def test_generate_is_jit_friendly(tiny, reference):
    prompt = reference["generate_prompt"]
    run = jax.jit(lambda params, prompt, rng: generate(tiny, params, prompt, 4, rng=rng, top_k=5))
    tokens = run(tiny.base, prompt, jax.random.key(2))
    np.testing.assert_array_equal(
        tokens, generate(tiny, tiny.base, prompt, 4, rng=jax.random.key(2), top_k=5)
    )


def test_generate_rejects_bad_arguments(tiny):
    prompt = np.zeros((1, 60), np.int32)
    with pytest.raises(ValueError, match="exceeds n_positions=64"):
        generate(tiny, tiny.base, prompt, 5, greedy=True)
    with pytest.raises(ValueError, match="needs an rng"):
        generate(tiny, tiny.base, prompt, 2)
    with pytest.raises(ValueError, match="top_k"):
        generate(tiny, tiny.base, prompt, 2, rng=jax.random.key(0), top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(tiny, tiny.base, prompt, 2, rng=jax.random.key(0), temperature=0.0)
    with pytest.raises(ValueError, match="batch, prompt_len"):
        generate(tiny, tiny.base, np.zeros((5,), np.int32), 2, greedy=True)


# --- errors -----------------------------------------------------------------------


def test_too_long_input_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="length 65 is outside 1..n_positions=64"):
        tiny.model.apply(tiny.base, np.zeros((1, 65), np.int32), None, False)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    directory = copy_fixture(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["n_embd"] = 48
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        load_gpt2(directory)
    message = str(info.value)
    # The first tensor in the file's (sorted) order, named as stored.
    assert "'transformer.h.0.attn.c_attn.bias'" in message
    assert "has shape [96]" in message and "implies [144]" in message
    assert str(directory / "model.safetensors") in message
    assert str(directory / "config.json") in message


def test_missing_files_name_the_path_and_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*save_pretrained"):
        load_gpt2(tmp_path)
    directory = copy_fixture(tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*Hugging Face layout"):
        load_gpt2(directory)


def test_truncated_or_corrupt_safetensors_is_a_clear_error(tmp_path):
    directory = copy_fixture(tmp_path)
    data = (FIXTURE / "model.safetensors").read_bytes()
    for cut in (len(data) // 2, 20, 3):
        (directory / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load_gpt2(directory)


def test_missing_unexpected_and_untied_tensors_are_named(tmp_path):
    directory = copy_fixture(tmp_path)
    path = directory / "model.safetensors"
    tensors = read_tensors(FIXTURE / "model.safetensors")
    write_tensors(path, {n: t for n, t in tensors.items() if n != "transformer.h.1.ln_2.bias"})
    with pytest.raises(ValueError, match="h_1/ln_2/bias"):
        load_gpt2(directory)
    write_tensors(
        path, {**tensors, "transformer.h.0.attn.q_proj.weight": np.zeros((2,), np.float32)}
    )
    with pytest.raises(ValueError, match="q_proj.weight"):
        load_gpt2(directory)
    untied = tensors["transformer.wte.weight"] + 1.0
    write_tensors(path, {**tensors, "lm_head.weight": untied})
    with pytest.raises(ValueError, match="tied"):
        load_gpt2(directory)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "unsupported architectures"),
        ({"model_type": "llama"}, "model_type"),
        ({"activation_function": "mish"}, "unsupported activation_function 'mish'"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"n_head": 5}, "multiple of n_head"),
    ],
)
def test_unsupported_configs_are_clear_errors(change, match):
    mapping = {**json.loads((FIXTURE / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match=match):
        GPT2Config.from_hf(mapping)


def test_config_mapping_fills_transformers_defaults():
    config = GPT2Config.from_hf({"n_layer": 2})
    assert config == GPT2Config(50257, 1024, 768, 2, 12)
    assert config.mlp_width == 4 * 768
    assert GPT2Config.from_hf({"n_inner": 100}).mlp_width == 100


def test_lora_errors_surface_when_loading(tmp_path):
    with pytest.raises(ValueError, match="'q_proj' matches no projection.*attn.c_attn"):
        load_gpt2(FIXTURE, LoraConfig(rank=2, targets=("q_proj",)))
    with pytest.raises(ValueError, match=r"rank 33 .*'h.0.attn.c_attn'.*\[32, 96\]"):
        load_gpt2(FIXTURE, LoraConfig(rank=33))
    with pytest.raises(ValueError, match="matches no projection"):
        GPT2(read_gpt2_config(FIXTURE), LoraConfig(2, targets=("mlp",))).init(
            jax.random.key(0), np.zeros((1, 1), np.int32)
        )
