"""One frozen config dataclass per model family, each building its model.

``model: cnn`` (or ``--model cnn``) picks a built-in model
(:func:`fedjaxsim.models.get_model`); ``--model gpt2 --model.checkpoint DIR``
fine-tunes a pretrained GPT-2-family checkpoint in the Hugging Face layout,
with LoRA adapters (``--model.lora-rank R``, 0 for every weight).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, NamedTuple

import tyro

from fedjaxsim.core.validation import InvalidArgument, check_int, check_real

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class BuiltModel(NamedTuple):
    """A model ready to train: what the algorithm trains and what stays frozen."""

    model: Any  # fedjaxsim.models.Model; its apply takes the full params
    params: Any  # the trained params: LoRA adapters, or every weight
    frozen: Any  # params every client reads and none trains (the base under LoRA); ()
    merge: Callable | None  # (frozen, trained) -> full params; None when nothing is frozen

    def full_params(self, trained):
        """The params ``model.apply`` takes, from the trained ones."""
        return trained if self.merge is None else self.merge(self.frozen, trained)


def model_config(cls):
    """A frozen, keyword-only dataclass."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


@model_config
class BuiltinModel:
    """A built-in model trained from scratch (fedjaxsim.models.get_model)."""

    name: Literal[
        "cnn", "dense", "logreg", "resnet18", "char_lstm", "word_lstm", "transformer", "tag_logreg"
    ] = "cnn"
    """The model."""

    pretrained: ClassVar[bool] = False

    def check(self) -> None:
        return None


@model_config
class Gpt2Model:
    """A pretrained GPT-2-family checkpoint (Hugging Face layout), fine-tuned with LoRA."""

    name: tyro.conf.Suppress[Literal["gpt2"]] = "gpt2"
    checkpoint: str = ""
    """Folder with config.json and model.safetensors (and tokenizer.json), e.g. a local
    copy of a Hugging Face GPT-2 repository. Nothing is downloaded."""
    lora_rank: int = 8
    """Rank r of the LoRA adapters (Hu et al. 2021); 0 trains every weight instead."""
    lora_alpha: float | None = None
    """LoRA's alpha: adapters are scaled by alpha / r (default alpha = r, a scale of 1)."""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """Projections that get adapters, matched by dotted suffix as in PEFT ("c_proj" is
    both attn.c_proj and mlp.c_proj)."""

    pretrained: ClassVar[bool] = True

    def check(self) -> None:
        if not self.checkpoint:
            raise InvalidArgument(
                "checkpoint",
                "model gpt2 needs --model.checkpoint DIR: a folder with config.json and "
                "model.safetensors in the Hugging Face layout (e.g. a local copy of "
                "https://huggingface.co/gpt2); nothing is downloaded",
            )
        folder = Path(self.checkpoint).expanduser()
        if not folder.is_dir():
            raise InvalidArgument(
                "checkpoint", f"{self.checkpoint!r} is not a folder; give the checkpoint's folder"
            )
        check_int("lora_rank", self.lora_rank, minimum=0)
        if self.lora_alpha is not None:
            check_real("lora_alpha", self.lora_alpha, minimum=0.0, strict_minimum=True)
        if self.lora_rank and not self.lora_targets:
            raise InvalidArgument(
                "lora_targets", f"LoRA needs at least one target; e.g. {', '.join(LORA_TARGETS)}"
            )

    @property
    def folder(self) -> Path:
        return Path(self.checkpoint).expanduser()

    def lora(self):
        """The :class:`~fedjaxsim.models.lora.LoraConfig`, or None for full fine-tuning."""
        from fedjaxsim.models.lora import LoraConfig

        if self.lora_rank == 0:
            return None
        return LoraConfig(
            rank=self.lora_rank, alpha=self.lora_alpha, targets=tuple(self.lora_targets)
        )

    def load(self, rng):
        """The checkpoint as a :class:`BuiltModel` (adapters initialised from ``rng``)."""
        from fedjaxsim.models.gpt2 import load_gpt2
        from fedjaxsim.models.lora import merge_params

        try:
            lm = load_gpt2(self.folder, self.lora(), rng=rng)
        except (OSError, ValueError) as error:
            raise InvalidArgument(_flag_at_fault(str(error)), str(error)) from error
        if self.lora_rank == 0:
            return BuiltModel(lm.model, lm.base, (), None), lm.config
        return BuiltModel(lm.model, lm.adapters, lm.base, merge_params), lm.config


def _flag_at_fault(message: str) -> str:
    """The ``model.*`` flag a loading error asks the user to change."""
    if "rank" in message:
        return "lora_rank"
    if "target" in message:
        return "lora_targets"
    return "checkpoint"


MODEL_CONFIGS = (BuiltinModel, Gpt2Model)
