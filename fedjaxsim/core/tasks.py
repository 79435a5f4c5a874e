"""What a dataset's labels mean: the task, and so its loss and metrics.

Three kinds of task cover the standard federated benchmarks (Reddi et al.
2021, "Adaptive Federated Optimization"):

* ``classification``: ``y`` int[batch], one class per example (EMNIST,
  CIFAR-100). Loss: softmax cross-entropy; metric: accuracy.
* ``next_token``: ``x`` and ``y`` int[batch, sequence], ``y`` the input
  shifted by one (Shakespeare, StackOverflow next-word prediction). A target
  equal to ``pad_id`` is padding: it carries no loss and no accuracy, so
  tokens carry their own mask inside the example mask. The loss is the mean
  over the real tokens of the real examples; accuracy also leaves out the
  targets in ``excluded_ids`` (oov, bos and eos for next-word prediction, as
  Reddi et al. report it).
* ``multilabel``: ``y`` int[batch, max_labels] label ids, where
  ``num_classes`` marks an empty slot (StackOverflow tag prediction). Loss:
  the sum over classes of sigmoid cross-entropy against the multi-hot target,
  averaged over examples; metrics: precision and recall at ``top_k``.

Every metric is a ratio of two sums, kept as sufficient statistics (clu's
style) so that sums over batches, clients and devices combine exactly; the
runner divides them. :func:`metric_sums` computes them for one batch and
:data:`RATIOS` says which sum divides which.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

TASK_KINDS = ("classification", "next_token", "multilabel")


@dataclasses.dataclass(frozen=True)
class Task:
    """The kind of labels a dataset has, with what its metrics leave out.

    Attributes:
      kind: one of :data:`TASK_KINDS`.
      pad_id: ``next_token``: the target id of padding tokens.
      excluded_ids: ``next_token``: target ids that count in the loss but not
        in accuracy (e.g. oov, bos, eos).
      top_k: ``multilabel``: k of precision and recall at k.
      input_vocab_size: for word-id inputs (tag prediction's bag of words),
        the words ``1..input_vocab_size``; 0 is padding and
        ``input_vocab_size + 1`` out of vocabulary. None for other inputs.
    """

    kind: str = "classification"
    pad_id: int = 0
    excluded_ids: tuple[int, ...] = ()
    top_k: int = 5
    input_vocab_size: int | None = None

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind must be one of {TASK_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "excluded_ids", tuple(int(i) for i in self.excluded_ids))
        if self.top_k < 1:
            raise ValueError(f"top_k must be positive, got {self.top_k}")

    def as_json(self) -> dict:
        return {
            "kind": self.kind,
            "pad_id": self.pad_id,
            "excluded_ids": list(self.excluded_ids),
            "top_k": self.top_k,
            "input_vocab_size": self.input_vocab_size,
        }

    @classmethod
    def from_json(cls, values: dict | None) -> Task:
        """The task of a stored description (``None``: classification, older stores)."""
        if values is None:
            return cls()
        return cls(
            kind=values["kind"],
            pad_id=int(values["pad_id"]),
            excluded_ids=tuple(values["excluded_ids"]),
            top_k=int(values["top_k"]),
            input_vocab_size=values.get("input_vocab_size"),
        )


CLASSIFICATION = Task()


class TokenLosses(NamedTuple):
    """Per-example losses of a task whose loss is a mean over tokens."""

    loss_sum: jax.Array  # float32[batch]: summed over the example's real tokens
    count: jax.Array  # float32[batch]: the example's real tokens


def _labels(batch, label_key: str) -> jax.Array:
    return jnp.asarray(batch[label_key]).astype(jnp.int32)


def multi_hot(labels: jax.Array, num_classes: int) -> jax.Array:
    """float32[..., num_classes]: 1 for every class listed in ``labels`` int[..., slots].

    A slot holding ``num_classes`` (or any id outside ``[0, num_classes)``) is empty.
    """
    hits = labels[..., :, None] == jnp.arange(num_classes, dtype=labels.dtype)
    return jnp.any(hits, axis=-2).astype(jnp.float32)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, real: jax.Array) -> jax.Array:
    """float32[...]: softmax cross-entropy of each target, 0 where ``real`` is False.

    Non-real targets are read as id 0, so a padding id outside the vocabulary
    (tokenized text pads targets with the tokenizer's vocabulary size, leaving
    every real token, end-of-text included, a target) never indexes past the
    logits.
    """
    safe = jnp.where(real, targets, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    return jnp.where(real, losses, 0.0)


def next_token_losses(logits: jax.Array, targets: jax.Array, pad_id: int) -> TokenLosses:
    """Softmax cross-entropy summed over each example's non-padding targets."""
    real = targets != pad_id
    losses = token_cross_entropy(logits, targets, real)
    return TokenLosses(jnp.sum(losses, axis=-1), jnp.sum(real, axis=-1, dtype=jnp.float32))


def multilabel_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """float32[batch]: sigmoid cross-entropy against the multi-hot target, averaged
    over classes, as Keras' ``BinaryCrossentropy`` in TFF's tag-prediction task."""
    logits = logits.astype(jnp.float32)
    targets = multi_hot(labels, logits.shape[-1])
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)


def task_loss(task: Task, model, input_key: str = "x", label_key: str = "y"):
    """The per-example training loss of ``model`` on ``task`` (``PerExampleLossFn``).

    ``next_token`` returns :class:`TokenLosses`, which
    :func:`fedjaxsim.core.losses.masked_mean_loss` turns into the mean over the
    real tokens of the real examples.
    """

    def per_example_loss(params, batch, rng):
        logits = model.apply(params, batch[input_key], rng, True)
        labels = _labels(batch, label_key)
        if task.kind == "next_token":
            return next_token_losses(logits, labels, task.pad_id)
        if task.kind == "multilabel":
            return multilabel_losses(logits, labels)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)

    return per_example_loss


# metric name -> (numerator sum, denominator sum), per task kind. ``loss`` is
# the mean the model trains on; the first ratio after it is the task's
# headline metric.
RATIOS = {
    "classification": {
        "loss": ("loss_sum", "loss_count"),
        "accuracy": ("num_correct", "num_predictions"),
    },
    "next_token": {
        "loss": ("loss_sum", "loss_count"),
        "accuracy": ("num_correct", "num_predictions"),
    },
    "multilabel": {
        "loss": ("loss_sum", "loss_count"),
        "recall_at_k": ("true_positives", "num_labels"),
        "precision_at_k": ("true_positives", "num_predictions"),
    },
}


def metric_names(task: Task) -> dict[str, tuple[str, str]]:
    """The task's metrics by the name the runner reports them under.

    ``recall_at_k`` and ``precision_at_k`` take the task's ``top_k``
    (``recall_at_5``); the first entry after ``loss`` is the headline metric.
    """
    names = {}
    for name, ratio in RATIOS[task.kind].items():
        names[name.replace("_at_k", f"_at_{task.top_k}")] = ratio
    return names


def headline_metric(task: Task) -> str:
    """The metric a run is judged by: accuracy, or recall at k for tags."""
    return list(metric_names(task))[1]


def metric_sums(task: Task, logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """float32[] sufficient statistics of one batch over its real examples.

    Args:
      task: the task.
      logits: the model's outputs for the batch.
      labels: ``y`` of the batch.
      mask: bool[batch], the real examples.

    Returns:
      The sums :data:`RATIOS` divides, plus ``num_examples``; multi-label
      accuracy is micro-averaged as Keras' ``Precision``/``Recall(top_k)``
      that TFF's tag-prediction task reports.
    """
    logits = logits.astype(jnp.float32)
    labels = jnp.asarray(labels).astype(jnp.int32)
    examples = jnp.sum(mask, dtype=jnp.float32)
    if task.kind == "multilabel":
        targets = multi_hot(labels, logits.shape[-1])
        _, top = jax.lax.top_k(logits, task.top_k)
        hits = jnp.take_along_axis(targets, top, axis=-1).sum(-1)
        losses = multilabel_losses(logits, labels)
        return {
            "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
            "loss_count": examples,
            "true_positives": jnp.sum(jnp.where(mask, hits, 0.0)),
            "num_labels": jnp.sum(jnp.where(mask, targets.sum(-1), 0.0)),
            "num_predictions": examples * task.top_k,
            "num_examples": examples,
        }
    correct = jnp.argmax(logits, axis=-1) == labels
    if task.kind == "next_token":
        token_mask = mask[:, None]
        real = (labels != task.pad_id) & token_mask
        counted = real
        for token in task.excluded_ids:
            counted = counted & (labels != token)
        return {
            "loss_sum": jnp.sum(token_cross_entropy(logits, labels, real)),
            "loss_count": jnp.sum(real, dtype=jnp.float32),
            "num_correct": jnp.sum(correct & counted, dtype=jnp.float32),
            "num_predictions": jnp.sum(counted, dtype=jnp.float32),
            "num_examples": examples,
        }
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "loss_count": examples,
        "num_correct": jnp.sum(correct & mask, dtype=jnp.float32),
        "num_predictions": examples,
        "num_examples": examples,
    }


def ratios(task: Task, sums) -> dict[str, float]:
    """Host floats of every metric of ``task`` from (summed) sufficient statistics.

    A metric whose denominator is zero is NaN, never a division error.
    """
    out = {}
    for name, (numerator, denominator) in metric_names(task).items():
        den = float(sums[denominator])
        out[name] = float(sums[numerator]) / den if den > 0 else float("nan")
    return out
