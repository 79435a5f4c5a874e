"""GPT-2 in flax linen, loaded from Hugging Face checkpoints, with LoRA adapters.

Radford, Wu, Child, Luan, Amodei and Sutskever, "Language Models are
Unsupervised Multitask Learners", 2019: a decoder-only transformer with
learned token and position embeddings, pre-LayerNorm blocks of causal
multi-head self-attention and a GELU MLP, a final LayerNorm and an output head
tied to the token embedding. :class:`GPT2` computes the same function as
Hugging Face's ``GPT2LMHeadModel`` (checked against its logits in
``tests/models/test_gpt2.py``), and :func:`load_gpt2` reads its checkpoints
(``config.json`` and ``model.safetensors``) from a local directory.

Every attention and MLP projection may carry a low-rank adapter (Hu et al.
2021, "LoRA: Low-Rank Adaptation of Large Language Models";
``fedjaxsim/models/lora.py``). A loaded model comes as a
:class:`PretrainedLM`: the frozen ``base`` parameters, held once and shared by
every client, and the trainable ``adapters``, which federated fine-tuning
stacks on the client axis. ``lm.model.apply`` takes the full tree,
``merge_params(base, adapters)``.

The library never imports torch or transformers; ``safetensors`` is imported
only inside :func:`load_gpt2`, so the package imports without it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjaxsim.models.lora import LoraConfig, select_targets, split_params
from fedjaxsim.models.model import Model, from_linen
from fedjaxsim.models.sequence import as_token_ids

# Hugging Face's names for the activation, and the function each names.
# "gelu_new", "gelu_fast" and "gelu_pytorch_tanh" are the tanh approximation
# of GELU (GPT-2's), "gelu" the exact erf form.
ACTIVATIONS: dict[str, Callable] = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

# Architectures whose checkpoints hold exactly the GPT-2 transformer (and, for
# the LM head model, an output head tied to the token embedding).
SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")

# transformers.GPT2Config's defaults, used for keys a config.json leaves out,
# as transformers does.
_HF_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
}

# The adaptable projections of one block, by their path inside the block.
BLOCK_PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

INITIALIZER_RANGE = 0.02  # GPT-2's init standard deviation (transformers' default)

# Hu et al. 2021 initialise A randomly and B to zero. The scale of A follows
# Hugging Face PEFT (kaiming_uniform with a=sqrt(5) on a [r, in] weight):
# uniform in +-1/sqrt(in_features).
LORA_A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=0)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The shape of a GPT-2 model, in Hugging Face's names.

    Attributes:
      vocab_size: token ids are ``0 .. vocab_size - 1``.
      n_positions: the longest sequence (learned position embeddings).
      n_embd: the width of the residual stream.
      n_layer: transformer blocks.
      n_head: attention heads; ``n_embd`` must be a multiple of it.
      layer_norm_epsilon: added to the variance in every LayerNorm.
      activation_function: the MLP's nonlinearity, a key of
        :data:`ACTIVATIONS` (GPT-2's is ``"gelu_new"``).
      embd_pdrop: dropout on the summed embeddings when training.
      resid_pdrop: dropout on each residual branch when training.
      attn_pdrop: dropout on the attention weights when training.
      n_inner: the MLP's hidden width; ``None`` means ``4 * n_embd``.
    """

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    n_inner: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be an int >= 1, got {value!r}")
        if self.n_inner is not None and (
            isinstance(self.n_inner, bool) or not isinstance(self.n_inner, int) or self.n_inner < 1
        ):
            raise ValueError(
                f"GPT2Config.n_inner must be an int >= 1 or None, got {self.n_inner!r}"
            )
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"unsupported activation_function {self.activation_function!r}; "
                f"supported: {sorted(ACTIVATIONS)}"
            )
        if not self.layer_norm_epsilon > 0:
            raise ValueError(
                f"GPT2Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}"
            )
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GPT2Config.{name} must be in [0, 1), got {value!r}")

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width (``n_inner``, default ``4 * n_embd``)."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @classmethod
    def from_hf(cls, mapping: Mapping[str, Any]) -> GPT2Config:
        """The config from a Hugging Face ``config.json`` mapping.

        Keys it leaves out take transformers' ``GPT2Config`` defaults, as
        transformers does; keys that do not change the forward pass
        (``bos_token_id``, ``summary_*``, ...) are ignored.

        Args:
          mapping: the parsed ``config.json``.

        Returns:
          The :class:`GPT2Config`.

        Raises:
          ValueError: a ``model_type`` other than ``"gpt2"``, an architecture
            not in :data:`SUPPORTED_ARCHITECTURES`, an unsupported
            ``activation_function``, or a setting this implementation does not
            reproduce (cross-attention, unscaled or layer-scaled attention,
            an output head not tied to the embedding).
        """
        model_type = mapping.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(
                f"config model_type is {model_type!r}; GPT2 loads only 'gpt2' checkpoints"
            )
        architectures = mapping.get("architectures") or []
        unknown = [name for name in architectures if name not in SUPPORTED_ARCHITECTURES]
        if unknown:
            raise ValueError(
                f"unsupported architectures {unknown} in the config; GPT2 loads "
                f"{list(SUPPORTED_ARCHITECTURES)}"
            )
        unsupported = {
            "add_cross_attention": (mapping.get("add_cross_attention", False), False),
            "scale_attn_weights": (mapping.get("scale_attn_weights", True), True),
            "scale_attn_by_inverse_layer_idx": (
                mapping.get("scale_attn_by_inverse_layer_idx", False),
                False,
            ),
            "tie_word_embeddings": (mapping.get("tie_word_embeddings", True), True),
        }
        for key, (value, supported) in unsupported.items():
            if bool(value) != supported:
                raise ValueError(
                    f"config {key}={value!r} is not supported; GPT2 implements {key}={supported}"
                )
        activation = mapping.get("activation_function", _HF_DEFAULTS["activation_function"])
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unsupported activation_function {activation!r} in the config; "
                f"supported: {sorted(ACTIVATIONS)}"
            )
        values = {key: mapping.get(key, default) for key, default in _HF_DEFAULTS.items()}
        return cls(**values)


def read_gpt2_config(directory: str | Path) -> GPT2Config:
    """Reads ``config.json`` from a Hugging Face model directory.

    Args:
      directory: a local directory in the Hugging Face layout.

    Returns:
      The :class:`GPT2Config` (:meth:`GPT2Config.from_hf`).

    Raises:
      FileNotFoundError: no ``config.json`` there (the message says what the
        directory must hold).
      ValueError: a file that is not JSON, or a config GPT2 does not support.
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no GPT-2 config at {path}; {_LAYOUT}")
    try:
        mapping = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(mapping, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(mapping).__name__}")
    return GPT2Config.from_hf(mapping)


_LAYOUT = (
    "a model directory in the Hugging Face layout holds config.json and "
    "model.safetensors (as written by transformers' "
    "save_pretrained(directory, safe_serialization=True))"
)


def projection_shapes(config: GPT2Config) -> dict[str, tuple[int, int]]:
    """Every adaptable projection, by Hugging Face module path, with ``(in, out)``."""
    width = {
        "attn.c_attn": (config.n_embd, 3 * config.n_embd),
        "attn.c_proj": (config.n_embd, config.n_embd),
        "mlp.c_fc": (config.n_embd, config.mlp_width),
        "mlp.c_proj": (config.mlp_width, config.n_embd),
    }
    return {
        f"h.{layer}.{name}": width[name]
        for layer in range(config.n_layer)
        for name in BLOCK_PROJECTIONS
    }


class Projection(nn.Module):
    """``x @ kernel + bias``, plus a LoRA update when ``rank > 0``.

    The kernel is ``[in, out]``, the layout of Hugging Face's ``Conv1D``. With
    an adapter (Hu et al. 2021) the output is
    ``x @ kernel + bias + scale * (x @ lora_a) @ lora_b`` with ``lora_a``
    ``[in, rank]`` and ``lora_b`` ``[rank, out]`` (zeros at init). The update
    stays two thin matmuls: ``kernel + lora_a @ lora_b`` would be a full-size
    weight per client under ``vmap``.
    """

    features: int
    rank: int = 0  # 0: no adapter
    scale: float = 1.0
    kernel_init: Callable = nn.initializers.normal(INITIALIZER_RANGE)

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (fan_in, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = x @ kernel + bias
        if self.rank:
            lora_a = self.param("lora_a", LORA_A_INIT, (fan_in, self.rank), jnp.float32)
            lora_b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
            y = y + self.scale * ((x @ lora_a) @ lora_b)
        return y


def _layer_norm(config: GPT2Config, name: str) -> nn.LayerNorm:
    # The two-pass variance (not E[x^2] - E[x]^2) is what torch computes.
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, use_fast_variance=False, name=name)


class _Attention(nn.Module):
    """Causal multi-head self-attention (``attn`` of a Hugging Face block)."""

    config: GPT2Config
    ranks: tuple[int, int]  # LoRA rank of (c_attn, c_proj); 0: none
    scale: float
    residual_init: Callable

    @nn.compact
    def __call__(self, x, deterministic: bool):
        config = self.config
        *lead, length, width = x.shape
        heads, head_dim = config.n_head, width // config.n_head
        qkv = Projection(3 * width, self.ranks[0], self.scale, name="c_attn")(x)
        q, k, v = (
            part.reshape(*lead, length, heads, head_dim) for part in jnp.split(qkv, 3, axis=-1)
        )
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
        causal = jnp.tril(jnp.ones((length, length), bool))
        # The most negative float, not -inf, as transformers masks.
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        weights = nn.Dropout(config.attn_pdrop)(weights, deterministic=deterministic)
        out = jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*lead, length, width)
        out = Projection(
            width, self.ranks[1], self.scale, kernel_init=self.residual_init, name="c_proj"
        )(out)
        return nn.Dropout(config.resid_pdrop)(out, deterministic=deterministic)


class _Mlp(nn.Module):
    """The block's MLP (``mlp``): ``c_fc``, the activation, ``c_proj``."""

    config: GPT2Config
    ranks: tuple[int, int]  # LoRA rank of (c_fc, c_proj); 0: none
    scale: float
    residual_init: Callable

    @nn.compact
    def __call__(self, x, deterministic: bool):
        config = self.config
        h = Projection(config.mlp_width, self.ranks[0], self.scale, name="c_fc")(x)
        h = ACTIVATIONS[config.activation_function](h)
        h = Projection(
            x.shape[-1], self.ranks[1], self.scale, kernel_init=self.residual_init, name="c_proj"
        )(h)
        return nn.Dropout(config.resid_pdrop)(h, deterministic=deterministic)


class _Block(nn.Module):
    """A pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    config: GPT2Config
    ranks: tuple[int, int, int, int]  # LoRA ranks in BLOCK_PROJECTIONS order
    scale: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        config = self.config
        # GPT-2 scales the init of the projections into the residual stream by
        # 1/sqrt(2 * n_layer) (Radford et al. 2019, Section 2.3).
        residual_init = nn.initializers.normal(INITIALIZER_RANGE / math.sqrt(2 * config.n_layer))
        attn = _Attention(config, self.ranks[:2], self.scale, residual_init, name="attn")
        mlp = _Mlp(config, self.ranks[2:], self.scale, residual_init, name="mlp")
        x = x + attn(_layer_norm(config, "ln_1")(x), deterministic)
        return x + mlp(_layer_norm(config, "ln_2")(x), deterministic)


class GPT2(nn.Module):
    """GPT-2 (Radford et al. 2019) with optional LoRA adapters (Hu et al. 2021).

    The function of Hugging Face's ``GPT2LMHeadModel`` in eval mode: token
    plus learned position embeddings, ``n_layer`` pre-LayerNorm blocks of
    causal self-attention and an MLP, a final LayerNorm, and logits from the
    output head tied to the token embedding (``h @ wte.T``). Dropout is active
    only when ``train=True`` and a ``"dropout"`` RNG is given. Matmuls use
    JAX's default precision, which on recent GPUs may be TF32 for float32;
    wrap calls in ``jax.default_matmul_precision("highest")`` to match
    float32 references there.

    The params tree: ``wte/embedding`` ``[vocab_size, n_embd]``,
    ``wpe/embedding`` ``[n_positions, n_embd]``, per block ``h_{i}`` the
    LayerNorms ``ln_1`` and ``ln_2`` (``scale``, ``bias``) and the projections
    ``attn/c_attn``, ``attn/c_proj``, ``mlp/c_fc``, ``mlp/c_proj``
    (``kernel`` ``[in, out]``, ``bias``, and ``lora_a``, ``lora_b`` where
    adapted), then ``ln_f``. LoRA targets match the Hugging Face module paths
    (``h.0.attn.c_attn``) by dotted suffix (:class:`LoraConfig`).

    Attributes:
      config: the model's shape.
      lora: adapters to add, or ``None`` for none.
    """

    config: GPT2Config
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        """Next-token logits.

        Args:
          tokens: integer ids ``[..., seq]`` with ``seq <= n_positions``.
          train: enables dropout (with a ``"dropout"`` RNG).

        Returns:
          float32 logits ``[..., seq, vocab_size]``; those at position t
          depend only on tokens ``0..t``.

        Raises:
          ValueError: a sequence longer than ``n_positions``; a LoRA target
            that matches no projection, or a rank too large for one.
        """
        config = self.config
        ids = as_token_ids(tokens)
        length = ids.shape[-1]
        if not 1 <= length <= config.n_positions:
            raise ValueError(
                f"token sequence length {length} is outside 1..n_positions="
                f"{config.n_positions} of this GPT-2; truncate or split the sequences"
            )
        ranks = self._ranks()
        scale = 1.0 if self.lora is None else self.lora.scale
        deterministic = not (train and self.has_rng("dropout"))
        init = nn.initializers.normal(INITIALIZER_RANGE)
        wte = nn.Embed(config.vocab_size, config.n_embd, embedding_init=init, name="wte")
        wpe = nn.Embed(config.n_positions, config.n_embd, embedding_init=init, name="wpe")
        h = wte(ids) + wpe(jnp.arange(length))
        h = nn.Dropout(config.embd_pdrop)(h, deterministic=deterministic)
        for layer in range(config.n_layer):
            h = _Block(config, ranks[layer], scale, name=f"h_{layer}")(h, deterministic)
        h = _layer_norm(config, "ln_f")(h)
        return wte.attend(h)

    def _ranks(self) -> list[tuple[int, int, int, int]]:
        """The LoRA rank of each block's projections (0 where not adapted)."""
        selected = (
            {} if self.lora is None else select_targets(self.lora, projection_shapes(self.config))
        )
        rank = 0 if self.lora is None else self.lora.rank
        return [
            tuple(rank if f"h.{layer}.{name}" in selected else 0 for name in BLOCK_PROJECTIONS)
            for layer in range(self.config.n_layer)
        ]


class PretrainedLM(NamedTuple):
    """A GPT-2 split for federated fine-tuning.

    ``model.apply(params, tokens, rng, train)`` takes the full tree
    ``merge_params(base, adapters)``.
    """

    model: Model  # from_linen(GPT2(config, lora))
    config: GPT2Config
    base: dict  # the frozen parameters (nested dict of float32 arrays)
    adapters: dict  # lora_a / lora_b leaves at their paths; {} without LoRA


def _dummy_tokens():
    return jnp.zeros((1, 1), jnp.int32)


def init_gpt2(
    config: GPT2Config, lora: LoraConfig | None = None, rng: jax.Array | None = None
) -> PretrainedLM:
    """A randomly initialised GPT-2, split into base and adapters.

    Weights are normal(0.02), the residual projections normal(0.02 /
    sqrt(2 * n_layer)), biases 0 and LayerNorms 1 (GPT-2's init, as in
    transformers); ``lora_a`` is uniform in +-1/sqrt(in) and ``lora_b`` zero.

    Args:
      config: the model's shape.
      lora: adapters to add, or ``None``.
      rng: the init key (default ``jax.random.key(0)``).

    Returns:
      A :class:`PretrainedLM`.

    Raises:
      ValueError: a LoRA target that matches no projection, or a rank too large.
    """
    model = from_linen(GPT2(config, lora))
    rng = jax.random.key(0) if rng is None else rng
    params = jax.jit(model.init)(rng, _dummy_tokens())
    base, adapters = split_params(params)
    return PretrainedLM(model, config, base, adapters)


# Hugging Face tensor names (after any "transformer." prefix) -> flax paths.
_BLOCK_TENSOR = re.compile(
    r"h\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)"
)
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers, not weights


def _flax_path(name: str) -> tuple[str, ...] | None:
    """The flax params path of a Hugging Face GPT-2 tensor, or None if not a weight."""
    if name in ("wte.weight", "wpe.weight"):
        return (name.split(".")[0], "embedding")
    if name in ("ln_f.weight", "ln_f.bias"):
        return ("ln_f", "scale" if name.endswith("weight") else "bias")
    match = _BLOCK_TENSOR.fullmatch(name)
    if match is None:
        return None
    layer, module, kind = match.groups()
    if module.startswith("ln_"):
        leaf = "scale" if kind == "weight" else "bias"
    else:
        leaf = "kernel" if kind == "weight" else "bias"
    return (f"h_{layer}", *module.split("."), leaf)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 NumPy, by name."""
    import safetensors  # lazily: only loading checkpoints needs it

    tensors = {}
    try:
        with safetensors.safe_open(str(path), framework="numpy") as file:
            for name in file.keys():
                dtype = file.get_slice(name).get_dtype()
                if dtype == "BF16":
                    # NumPy has no bfloat16: read the raw 16 bits and widen
                    # them into the high half of a float32.
                    tensors[name] = _bf16_to_float32(path, name)
                else:
                    tensors[name] = np.asarray(file.get_tensor(name), np.float32)
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"cannot read {path} as a safetensors file ({err}); it may be truncated or "
            "corrupt: download it again, or re-save the model with "
            "save_pretrained(directory, safe_serialization=True)"
        ) from err
    return tensors


def _bf16_to_float32(path: Path, name: str) -> np.ndarray:
    """A bfloat16 tensor of a safetensors file, widened to float32."""
    with path.open("rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
        start, end = header[name]["data_offsets"]
        file.seek(8 + header_size + start)
        raw = np.frombuffer(file.read(end - start), np.uint16)
    if raw.size != math.prod(header[name]["shape"]):
        raise ValueError(f"tensor {name!r} is cut short")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(header[name]["shape"])


def load_gpt2(
    directory: str | Path, lora: LoraConfig | None = None, rng: jax.Array | None = None
) -> PretrainedLM:
    """Loads a GPT-2 checkpoint in the Hugging Face layout from a local directory.

    Reads ``config.json`` and ``model.safetensors`` as written by
    transformers' ``save_pretrained(directory, safe_serialization=True)``, for
    ``GPT2LMHeadModel`` (tensor names prefixed ``transformer.``) or
    ``GPT2Model`` (no prefix). The causal-mask buffers ``attn.bias`` and
    ``attn.masked_bias`` are skipped, and so is ``lm_head.weight`` when it
    equals the token embedding (GPT-2 ties them). Tensors are read as float32.

    Args:
      directory: the model directory.
      lora: adapters to add, or ``None``.
      rng: the key of the adapters' init (default ``jax.random.key(0)``).

    Returns:
      A :class:`PretrainedLM` whose ``base`` holds the checkpoint's weights and
      whose ``adapters`` are freshly initialised (``lora_b`` zero, so the
      loaded model's function is unchanged).

    Raises:
      FileNotFoundError: no ``config.json`` or ``model.safetensors``.
      ValueError: an unreadable (truncated, corrupt) safetensors file; a
        tensor whose shape differs from what ``config.json`` implies; a
        missing or unexpected tensor; an untied output head; a config GPT2
        does not support; a bad LoRA target or rank.
    """
    directory = Path(directory)
    config = read_gpt2_config(directory)
    weights_path = directory / "model.safetensors"
    if not weights_path.is_file():
        sharded = (directory / "model.safetensors.index.json").is_file()
        hint = (
            " (sharded checkpoints, model.safetensors.index.json, are not supported; "
            "re-save with a larger max_shard_size)"
            if sharded
            else ""
        )
        raise FileNotFoundError(f"no GPT-2 weights at {weights_path}{hint}; {_LAYOUT}")

    model = from_linen(GPT2(config, lora))
    # Shapes only: nothing is initialised, and bad LoRA settings fail here.
    expected = split_params(jax.eval_shape(model.init, jax.random.key(0), _dummy_tokens()))[0]
    tensors = _read_safetensors(weights_path)

    config_path = directory / "config.json"
    base: dict = {}
    unexpected = []
    head = None
    for name, array in tensors.items():
        short = name.removeprefix("transformer.")
        if _BUFFER.fullmatch(short):
            continue
        if short == "lm_head.weight":
            head = (name, array)
            continue
        path = _flax_path(short)
        want = _get(expected, path) if path is not None else None
        if want is None:
            unexpected.append(name)
            continue
        if tuple(array.shape) != tuple(want.shape):
            raise ValueError(
                f"tensor {name!r} in {weights_path} has shape {list(array.shape)}, but "
                f"{config_path} implies {list(want.shape)}; the checkpoint and its "
                "config.json do not belong together"
            )
        _set(base, path, jnp.asarray(array))
    if unexpected:
        raise ValueError(
            f"{weights_path} holds tensors that are not GPT-2 weights: {sorted(unexpected)}; "
            f"GPT2 loads checkpoints of {list(SUPPORTED_ARCHITECTURES)}"
        )
    missing = ["/".join(path) for path, _ in _leaf_paths(expected) if _get(base, path) is None]
    if missing:
        raise ValueError(
            f"{weights_path} lacks the tensors for {missing} (flax paths) that "
            f"{config_path} implies"
        )
    if head is not None and not np.array_equal(head[1], np.asarray(base["wte"]["embedding"])):
        raise ValueError(
            f"{head[0]!r} in {weights_path} differs from the token embedding; GPT2 "
            "supports only an output head tied to wte (tie_word_embeddings=True)"
        )

    adapters: dict = {}
    if lora is not None:
        rng = jax.random.key(0) if rng is None else rng
        # Only the adapters leave the jitted init, so XLA drops the base's
        # random init as dead code.
        adapters = jax.jit(lambda key: split_params(model.init(key, _dummy_tokens()))[1])(rng)
    return PretrainedLM(model, config, base, adapters)


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def generate(
    lm: PretrainedLM,
    params,
    prompt,
    max_new_tokens: int,
    *,
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
) -> jax.Array:
    """Extends prompts token by token, greedily or by sampling.

    A fixed-size ``[batch, prompt_len + max_new_tokens]`` buffer and a
    ``lax.fori_loop``, so one compile serves every call of the same shape.
    Each step runs the model over the whole buffer (no KV cache): the causal
    mask keeps the not-yet-written positions from affecting the logits read,
    at O(length^2) cost, small for checks and tutorials.

    Args:
      lm: the model (its ``model.apply`` and ``config``).
      params: the full params, ``merge_params(lm.base, adapters)``.
      prompt: integer ids ``[batch, prompt_len]``, ``prompt_len >= 1``.
      max_new_tokens: tokens to append (>= 0).
      rng: the sampling key; required unless ``greedy``.
      temperature: logits are divided by it before sampling (> 0).
      top_k: sample among the ``top_k`` most likely tokens only; ``None`` for
        all. ``top_k=1`` is greedy decoding.
      greedy: take the most likely token (the first on ties) at every step;
        ``rng``, ``temperature`` and ``top_k`` are then ignored.

    Returns:
      int32 ``[batch, prompt_len + max_new_tokens]``: the prompt, then the
      new tokens. Step t samples with ``jax.random.fold_in(rng, t)``.

    Raises:
      ValueError: a prompt that is not 2-D or empty, a total length above
        ``n_positions``, a bad ``max_new_tokens``, ``temperature`` or
        ``top_k``, or sampling without ``rng``.
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(
            f"prompt must be integer ids [batch, prompt_len >= 1], got shape {prompt.shape}"
        )
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    if total > lm.config.n_positions:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"n_positions={lm.config.n_positions}; shorten the prompt or generate fewer tokens"
        )
    if not greedy:
        if rng is None:
            raise ValueError("sampling needs an rng; pass rng=jax.random.key(...) or greedy=True")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if top_k is not None and (
            isinstance(top_k, bool)
            or not isinstance(top_k, int)
            or not 1 <= top_k <= lm.config.vocab_size
        ):
            raise ValueError(
                f"top_k must be None or an int in 1..vocab_size={lm.config.vocab_size}, "
                f"got {top_k!r}"
            )
    else:
        rng, temperature, top_k = jax.random.key(0), 1.0, None
    buffer = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt.astype(jnp.int32))
    return _decode(
        lm.model.apply, params, buffer, rng, jnp.float32(temperature), prompt_len, top_k, greedy
    )


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _decode(apply, params, buffer, rng, temperature, prompt_len, top_k, greedy):
    """The decoding loop of :func:`generate` over positions ``prompt_len..``."""

    def step(t, buffer):
        logits = apply(params, buffer, None, False)  # [batch, total, vocab]
        logits = jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)
        if greedy:
            token = jnp.argmax(logits, axis=-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            token = jax.random.categorical(jax.random.fold_in(rng, t), logits, axis=-1)
        return jax.lax.dynamic_update_index_in_dim(
            buffer, token.astype(jnp.int32)[:, None], t, axis=1
        )

    return jax.lax.fori_loop(prompt_len, buffer.shape[1], step, buffer)


__all__ = [
    "ACTIVATIONS",
    "GPT2",
    "GPT2Config",
    "PretrainedLM",
    "Projection",
    "SUPPORTED_ARCHITECTURES",
    "generate",
    "init_gpt2",
    "load_gpt2",
    "projection_shapes",
    "read_gpt2_config",
]
