"""Per-client evaluation: the distribution of accuracy over test clients.

Fairness is a first-class metric in federated learning: a global model can
have a good pooled accuracy while serving a tail of clients badly. The runner
evaluates a fixed sample of test clients one by one and reports the mean, the
10th, 50th and 90th percentiles of per-client accuracy, and the mean of the
worst 10% of clients.

The sampled clients are packed once, on the host, into one padded pytree
``[num_clients, num_batches, batch_size, ...]`` with an example mask, so the
jitted evaluation compiles once per run: vmap over clients (in chunks of
``clients_per_chunk`` with ``lax.map``, which bounds memory the way the
training engine's chunks do), ``lax.scan`` over each client's batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np

from fedjaxsim.core.evaluation import client_distribution, task_sums
from fedjaxsim.core.tasks import CLASSIFICATION, Task, headline_metric, metric_names


class ClientEvalBatches(NamedTuple):
    inputs: np.ndarray  # any[num_clients, num_batches, batch_size, ...]
    labels: np.ndarray  # int32[num_clients, num_batches, batch_size, ...]
    mask: np.ndarray  # bool[num_clients, num_batches, batch_size]


def pack_eval_clients(
    clients: Sequence[Mapping[str, np.ndarray]],
    batch_size: int,
    input_key: str = "x",
    label_key: str = "y",
) -> ClientEvalBatches:
    """Pads every client to the largest client's number of batches (host NumPy).

    Raises:
      ValueError: for no clients, an empty client or a bad batch size.
    """
    if not clients:
        raise ValueError("per-client evaluation needs at least one client")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sizes = [len(client[label_key]) for client in clients]
    if min(sizes) == 0:
        raise ValueError(f"test client {sizes.index(0)} has no examples")
    num_batches = max(math.ceil(n / batch_size) for n in sizes)
    slots = num_batches * batch_size
    first = np.asarray(clients[0][input_key])
    inputs = np.zeros((len(clients), slots, *first.shape[1:]), first.dtype)
    first_labels = np.asarray(clients[0][label_key])
    labels = np.zeros((len(clients), slots, *first_labels.shape[1:]), np.int32)
    mask = np.zeros((len(clients), slots), bool)
    for index, (client, n) in enumerate(zip(clients, sizes)):
        inputs[index, :n] = client[input_key]
        labels[index, :n] = client[label_key]
        mask[index, :n] = True

    def batched(array):
        return array.reshape(len(clients), num_batches, batch_size, *array.shape[2:])

    return ClientEvalBatches(batched(inputs), batched(labels), batched(mask))


def build_per_client_eval(
    apply_fn, clients_per_chunk: int | None = None, task: Task = CLASSIFICATION
):
    """Returns jitted ``evaluate(params, ClientEvalBatches) -> dict``.

    The dict holds float32[num_clients] sums per client: those of
    :func:`fedjaxsim.core.evaluation.task_sums` (for a classifier ``loss_sum``,
    ``num_correct`` and ``num_examples`` among them).

    Args:
      apply_fn: ``(params, inputs, rng, train) -> logits``, called with
        ``rng=None, train=False``.
      clients_per_chunk: clients evaluated together under one vmap; None
        evaluates all at once.
      task: what the labels mean.
    """

    @jax.jit
    def evaluate(params, batches: ClientEvalBatches):
        def per_client(batch):
            return task_sums(task, apply_fn, params, *batch)

        if clients_per_chunk is None:
            return jax.vmap(per_client)(tuple(batches))
        # lax.map with batch_size: a loop over chunks, each chunk vmapped.
        return jax.lax.map(per_client, tuple(batches), batch_size=clients_per_chunk)

    return evaluate


def per_client_record(
    sums: Mapping[str, np.ndarray], task: Task = CLASSIFICATION
) -> dict[str, float]:
    """The metrics record fields of one per-client evaluation.

    ``client_<metric>_{mean,p10,p50,p90,worst10_mean}`` of the task's headline
    metric (accuracy; recall at k for tags) over the clients that have
    something to score (a test client whose every target is padding has none),
    ``client_loss_mean`` and ``num_eval_clients``.
    """
    names = metric_names(task)
    metric = headline_metric(task)
    numerator, denominator = (np.asarray(sums[k], np.float64) for k in names[metric])
    loss_sum, loss_count = (np.asarray(sums[k], np.float64) for k in names["loss"])
    scored = denominator > 0
    values = numerator[scored] / denominator[scored]
    record = {f"client_{metric}_{k}": v for k, v in client_distribution(values).items()}
    record["client_loss_mean"] = float(np.mean(loss_sum[scored] / loss_count[scored]))
    record["num_eval_clients"] = int(scored.sum())
    return record
