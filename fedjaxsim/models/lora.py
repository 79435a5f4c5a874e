"""Low-rank adaptation (LoRA) as a split of a model's parameters.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang and Chen, "LoRA: Low-Rank
Adaptation of Large Language Models", 2021 (arXiv:2106.09685). A frozen
projection ``y = x @ W + b`` with ``W`` of shape ``[in, out]`` gains a
trainable low-rank update: ``y = x @ W + b + (alpha / r) * (x @ A) @ B`` with
``A`` of shape ``[in, r]`` (random init) and ``B`` of shape ``[r, out]``
(zeros), so training starts from the base model exactly.

For federated fine-tuning the parameters split in two: the frozen **base**
(held once and passed to every client, ``in_axes=None`` under ``vmap``) and the
trainable **adapters** (``lora_a`` and ``lora_b`` leaves only, stacked on the
client axis). :func:`split_params` and :func:`merge_params` convert between
the full linen params tree and that pair; both are pure dict operations, so
they trace inside ``jit`` and ``vmap`` at no cost.

The model applies the update as two thin matmuls and never forms
``W + scale * A @ B``: under ``vmap`` over clients that sum would put a
full-size weight matrix per client in memory.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping

ADAPTER_NAMES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which projections get low-rank adapters, and their rank and scale.

    Attributes:
      rank: the rank ``r`` of every adapter (an int >= 1).
      alpha: the scale numerator; the update is multiplied by ``alpha / rank``
        (Hu et al. 2021, Section 4.1). ``None`` means ``alpha = rank``, a scale
        of 1.
      targets: projections to adapt, matched against their dotted module paths
        by suffix as Hugging Face PEFT does: a target selects every path that
        equals it or ends with ``"." + target``. So ``"c_proj"`` selects both
        ``attn.c_proj`` and ``mlp.c_proj`` of every block, and
        ``"h.0.attn.c_attn"`` only the first block's query/key/value
        projection. The default adapts every attention and MLP projection of
        a GPT-2 block.
    """

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

    def __post_init__(self):
        if (
            isinstance(self.rank, bool)
            or not isinstance(self.rank, numbers.Integral)
            or self.rank < 1
        ):
            raise ValueError(f"LoraConfig.rank must be an int >= 1, got {self.rank!r}")
        if self.alpha is not None and (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, numbers.Real)
            or not self.alpha > 0
        ):
            raise ValueError(
                f"LoraConfig.alpha must be a number > 0 (or None for alpha = rank), "
                f"got {self.alpha!r}"
            )
        if isinstance(self.targets, str):
            # A bare string would be read as a tuple of one-letter targets.
            raise ValueError(
                f"LoraConfig.targets must be a tuple of module names, got the string "
                f"{self.targets!r}; write targets=({self.targets!r},)"
            )
        targets = tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"LoraConfig.targets must be a non-empty tuple of module names such as "
                f"'attn.c_attn', got {self.targets!r}"
            )
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on the low-rank update."""
        alpha = self.rank if self.alpha is None else self.alpha
        return float(alpha) / self.rank


def target_matches(path: str, target: str) -> bool:
    """Whether a dotted module path is selected by a target (PEFT's suffix rule)."""
    return path == target or path.endswith("." + target)


def select_targets(
    lora: LoraConfig, projections: Mapping[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """The projections a :class:`LoraConfig` adapts, checked against the model.

    Args:
      lora: the adapter configuration.
      projections: every adaptable projection of the model, by dotted module
        path (``"h.0.attn.c_attn"``), with its ``(in_features, out_features)``.

    Returns:
      The selected subset of ``projections``, in their order.

    Raises:
      ValueError: a target that matches no projection (the message lists the
        projections that exist), or a rank larger than
        ``min(in_features, out_features)`` of a selected projection (the
        message names the projection and its shape).
    """
    for target in lora.targets:
        if not any(target_matches(path, target) for path in projections):
            raise ValueError(
                f"LoRA target {target!r} matches no projection of the model; targets "
                f"match module paths by dotted suffix. Projections: "
                f"{_describe(projections)}"
            )
    selected = {
        path: shape
        for path, shape in projections.items()
        if any(target_matches(path, target) for target in lora.targets)
    }
    for path, (fan_in, fan_out) in selected.items():
        if lora.rank > min(fan_in, fan_out):
            raise ValueError(
                f"LoRA rank {lora.rank} is larger than the projection {path!r} it adapts, "
                f"whose kernel is [{fan_in}, {fan_out}]; a low-rank update needs "
                f"rank <= {min(fan_in, fan_out)}: lower the rank or drop that target"
            )
    return selected


def _describe(projections: Mapping[str, tuple[int, int]]) -> str:
    """The projection paths, grouped by their part after ``h.<i>.``, for messages."""
    suffixes: dict[str, list[str]] = {}
    for path in projections:
        head, _, rest = path.partition(".")
        index, _, suffix = rest.partition(".")
        if head == "h" and index.isdigit() and suffix:
            suffixes.setdefault(suffix, []).append(index)
        else:
            suffixes.setdefault(path, [])
    parts = []
    for suffix, indices in suffixes.items():
        if indices:
            parts.append(f"{suffix} (in h.{indices[0]} .. h.{indices[-1]})")
        else:
            parts.append(suffix)
    return ", ".join(parts)


def split_params(params: Mapping) -> tuple[dict, dict]:
    """Splits a params tree into the frozen base and the LoRA adapters.

    Args:
      params: a nested mapping (flax linen params).

    Returns:
      ``(base, adapters)``: ``adapters`` holds the leaves named ``lora_a`` and
      ``lora_b`` (:data:`ADAPTER_NAMES`) at their original dict paths, ``base``
      everything else. Sub-dicts left empty are dropped, so a model without
      adapters gives ``adapters == {}``. :func:`merge_params` inverts it.
    """
    base: dict = {}
    adapters: dict = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            sub_base, sub_adapters = split_params(value)
            if sub_base:
                base[key] = sub_base
            if sub_adapters:
                adapters[key] = sub_adapters
        elif key in ADAPTER_NAMES:
            adapters[key] = value
        else:
            base[key] = value
    return base, adapters


def merge_params(base: Mapping, adapters: Mapping) -> dict:
    """The full params tree from a base and its adapters (inverse of :func:`split_params`).

    Args:
      base: the frozen parameters, a nested mapping.
      adapters: the ``lora_a`` / ``lora_b`` leaves, a nested mapping whose
        paths complete ``base``'s.

    Returns:
      A new nested dict with every leaf of both; the leaves are not copied.

    Raises:
      ValueError: a path present as a leaf in one tree and a sub-tree (or a
        leaf) in the other, naming the path.
    """
    return _merge(base, adapters, ())


def _merge(base: Mapping, adapters: Mapping, path: tuple[str, ...]) -> dict:
    # Sub-trees the adapters do not reach are shared, not copied: neither
    # input is ever mutated.
    merged = dict(base)
    for key, value in adapters.items():
        if key not in merged:
            merged[key] = _merge({}, value, (*path, key)) if isinstance(value, Mapping) else value
        elif isinstance(value, Mapping) and isinstance(base[key], Mapping):
            merged[key] = _merge(base[key], value, (*path, key))
        else:
            raise ValueError(
                f"merge_params: {'/'.join((*path, str(key)))} is in both the base and the "
                "adapters; pass the two halves returned by split_params"
            )
    return merged


__all__ = [
    "ADAPTER_NAMES",
    "LoraConfig",
    "merge_params",
    "select_targets",
    "split_params",
    "target_matches",
]
