"""LoRA (Hu et al. 2021): the config, target selection and the base/adapter split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxsim.models import (
    GPT2,
    GPT2Config,
    LoraConfig,
    init_gpt2,
    merge_params,
    split_params,
)
from fedjaxsim.models.gpt2 import Projection, projection_shapes
from fedjaxsim.models.lora import ADAPTER_NAMES, select_targets

CONFIG = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)


def adapter_shapes(config: GPT2Config, lora: LoraConfig):
    """The adapters' shapes, traced without compiling (tests stay fast)."""
    full = jax.eval_shape(
        GPT2(config, lora).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    )
    return split_params(full["params"])[1]


def adapted_paths(adapters) -> set[str]:
    """Hugging Face module paths of the projections holding adapters."""
    paths = set()
    for path, _ in jax.tree_util.tree_leaves_with_path(adapters):
        keys = [entry.key for entry in path]
        block, *module, leaf = keys
        assert leaf in ADAPTER_NAMES
        paths.add(".".join(["h", block.removeprefix("h_"), *module]))
    return paths


# --- LoraConfig -----------------------------------------------------------------


def test_scale_is_alpha_over_rank_and_defaults_to_one():
    assert LoraConfig(rank=8).scale == 1.0
    assert LoraConfig(rank=8, alpha=16).scale == 2.0
    assert LoraConfig(rank=4, alpha=1.0).scale == 0.25
    assert LoraConfig(2).targets == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank must be an int >= 1, got 0"),
        ({"rank": -2}, "rank must be an int >= 1"),
        ({"rank": 1.5}, "rank must be an int >= 1, got 1.5"),
        ({"rank": True}, "rank must be an int"),
        ({"rank": 2, "alpha": 0.0}, "alpha must be a number > 0"),
        ({"rank": 2, "alpha": -1}, "alpha must be a number > 0"),
        ({"rank": 2, "alpha": float("nan")}, "alpha must be a number > 0"),
        ({"rank": 2, "targets": "c_attn"}, r"targets=\('c_attn',\)"),
        ({"rank": 2, "targets": ()}, "non-empty tuple"),
        ({"rank": 2, "targets": ("c_attn", "")}, "non-empty tuple"),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_targets_given_as_a_list_become_a_hashable_tuple():
    lora = LoraConfig(2, targets=["c_fc"])
    assert lora.targets == ("c_fc",)
    hash(lora)  # flax module attributes must hash


# --- target selection -----------------------------------------------------------


@pytest.mark.parametrize(
    "targets, expected",
    [
        (("c_proj",), {"h.0.attn.c_proj", "h.0.mlp.c_proj", "h.1.attn.c_proj", "h.1.mlp.c_proj"}),
        (("attn.c_proj",), {"h.0.attn.c_proj", "h.1.attn.c_proj"}),
        (
            ("c_attn", "mlp.c_fc"),
            {"h.0.attn.c_attn", "h.1.attn.c_attn", "h.0.mlp.c_fc", "h.1.mlp.c_fc"},
        ),
        (("h.1.attn.c_attn",), {"h.1.attn.c_attn"}),
    ],
)
def test_targets_select_projections_by_dotted_suffix(targets, expected):
    lora = LoraConfig(rank=2, targets=targets)
    assert set(select_targets(lora, projection_shapes(CONFIG))) == expected
    # The model puts adapters exactly there.
    assert adapted_paths(adapter_shapes(CONFIG, lora)) == expected


def test_a_suffix_must_match_whole_names():
    # "proj" is a substring of c_proj but not a dotted suffix, as in PEFT.
    with pytest.raises(ValueError, match="'proj' matches no projection"):
        select_targets(LoraConfig(2, targets=("proj",)), projection_shapes(CONFIG))


def test_unknown_target_lists_the_projections():
    with pytest.raises(ValueError) as info:
        adapter_shapes(CONFIG, LoraConfig(rank=2, targets=("attn.c_attn", "q_proj")))
    message = str(info.value)
    assert "'q_proj' matches no projection" in message
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert f"{name} (in h.0 .. h.1)" in message


def test_rank_larger_than_a_layer_names_the_layer_and_its_shape():
    # c_attn is [16, 48]: rank 16 fits, 17 does not.
    adapter_shapes(CONFIG, LoraConfig(rank=16, targets=("c_attn",)))
    with pytest.raises(ValueError, match=r"rank 17 .*'h.0.attn.c_attn'.*\[16, 48\].*rank <= 16"):
        adapter_shapes(CONFIG, LoraConfig(rank=17, targets=("c_attn",)))
    narrow = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, n_inner=4)
    with pytest.raises(ValueError, match=r"'h.0.mlp.c_fc'.*\[16, 4\]"):
        adapter_shapes(narrow, LoraConfig(rank=5, targets=("mlp.c_fc",)))


# --- split and merge ------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_lm():
    return init_gpt2(CONFIG, LoraConfig(rank=3, alpha=6.0), rng=jax.random.key(7))


def test_adapters_hold_only_lora_leaves_and_base_none(lora_lm):
    adapter_leaves = jax.tree_util.tree_leaves_with_path(lora_lm.adapters)
    assert len(adapter_leaves) == 2 * 4 * CONFIG.n_layer
    assert {path[-1].key for path, _ in adapter_leaves} == set(ADAPTER_NAMES)
    base_names = {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(lora_lm.base)}
    assert not base_names & set(ADAPTER_NAMES)
    a = lora_lm.adapters["h_1"]["mlp"]["c_proj"]["lora_a"]
    b = lora_lm.adapters["h_1"]["mlp"]["c_proj"]["lora_b"]
    assert a.shape == (4 * CONFIG.n_embd, 3) and b.shape == (3, CONFIG.n_embd)
    # Hu et al.: A random, B zero.
    assert np.abs(np.asarray(a)).max() > 0
    np.testing.assert_array_equal(b, 0.0)


def test_split_and_merge_round_trip_exactly(lora_lm):
    params = merge_params(lora_lm.base, lora_lm.adapters)
    base, adapters = split_params(params)
    assert jax.tree.structure(base) == jax.tree.structure(lora_lm.base)
    assert jax.tree.structure(adapters) == jax.tree.structure(lora_lm.adapters)
    again = merge_params(base, adapters)
    assert jax.tree.structure(again) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        assert x is y  # leaves are moved, never copied or cast
    # And from the module's own init tree (the shapes suffice).
    full = jax.eval_shape(
        GPT2(CONFIG, LoraConfig(2)).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    )["params"]
    assert jax.tree.structure(merge_params(*split_params(full))) == jax.tree.structure(full)


def test_split_without_adapters_gives_an_empty_tree():
    lm = init_gpt2(CONFIG)
    base, adapters = split_params(lm.base)
    assert adapters == {}
    assert jax.tree.structure(base) == jax.tree.structure(lm.base)
    assert merge_params(base, {}) == base


def test_split_and_merge_work_on_nested_dicts_in_general():
    params = {"a": {"kernel": 1, "lora_a": 2}, "b": {"c": {"lora_b": 3}}, "d": 4}
    base, adapters = split_params(params)
    assert base == {"a": {"kernel": 1}, "d": 4}
    assert adapters == {"a": {"lora_a": 2}, "b": {"c": {"lora_b": 3}}}
    assert merge_params(base, adapters) == params
    assert params == {"a": {"kernel": 1, "lora_a": 2}, "b": {"c": {"lora_b": 3}}, "d": 4}


def test_merge_rejects_overlapping_trees():
    with pytest.raises(ValueError, match="a/kernel is in both"):
        merge_params({"a": {"kernel": 1}}, {"a": {"kernel": 2}})


def test_split_and_merge_trace_under_jit_and_vmap(lora_lm):
    stacked = jax.tree.map(lambda a: jnp.stack([a, a + 1.0]), lora_lm.adapters)

    def total(base, adapters):
        return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(merge_params(base, adapters)))

    sums = jax.jit(jax.vmap(total, in_axes=(None, 0)))(lora_lm.base, stacked)
    count = sum(leaf.size for leaf in jax.tree.leaves(lora_lm.adapters))
    np.testing.assert_allclose(sums[1] - sums[0], count, rtol=1e-5)


# --- one projection against float64 NumPy --------------------------------------


@jax.default_matmul_precision("highest")  # no TF32 on GPUs; no effect on CPU
def test_projection_update_equals_the_merged_kernel_in_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    params = {
        "kernel": rng.standard_normal((8, 6)).astype(np.float32),
        "bias": rng.standard_normal(6).astype(np.float32),
        "lora_a": rng.standard_normal((8, 2)).astype(np.float32),
        "lora_b": rng.standard_normal((2, 6)).astype(np.float32),
    }
    module = Projection(features=6, rank=2, scale=1.5)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, params)
    out = module.apply({"params": params}, x)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    expected = x.astype(np.float64) @ (p["kernel"] + 1.5 * p["lora_a"] @ p["lora_b"]) + p["bias"]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    # Zero B: exactly the frozen projection.
    zero_b = {**params, "lora_b": np.zeros_like(params["lora_b"])}
    plain = Projection(features=6).apply(
        {"params": {"kernel": params["kernel"], "bias": params["bias"]}}, x
    )
    np.testing.assert_array_equal(module.apply({"params": zero_b}, x), plain)


def test_the_update_is_never_a_full_size_weight():
    # The forward pass holds no [in, out] array but the frozen kernel: the
    # update goes through the [.., rank] bottleneck.
    x = jnp.ones((2, 4, 8))
    module = Projection(features=6, rank=2)
    params = module.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda p, x: module.apply(p, x))(params, x)
    shapes = [tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
    assert (8, 6) not in shapes
