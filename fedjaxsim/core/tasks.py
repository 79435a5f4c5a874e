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
    """

    kind: str = "classification"
    pad_id: int = 0
    excluded_ids: tuple[int, ...] = ()
    top_k: int = 5

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
        )


CLASSIFICATION = Task()
