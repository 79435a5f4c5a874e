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

from fedjaxsim.core.evaluation import classification_sums, client_distribution


class ClientEvalBatches(NamedTuple):
    inputs: np.ndarray  # any[num_clients, num_batches, batch_size, ...]
    labels: np.ndarray  # int32[num_clients, num_batches, batch_size]
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
    labels = np.zeros((len(clients), slots), np.int32)
    mask = np.zeros((len(clients), slots), bool)
    for index, (client, n) in enumerate(zip(clients, sizes)):
        inputs[index, :n] = client[input_key]
        labels[index, :n] = client[label_key]
        mask[index, :n] = True

    def batched(array):
        return array.reshape(len(clients), num_batches, batch_size, *array.shape[2:])

    return ClientEvalBatches(batched(inputs), batched(labels), batched(mask))


def build_per_client_eval(apply_fn, clients_per_chunk: int | None = None):
    """Returns jitted ``evaluate(params, ClientEvalBatches) -> dict``.

    The dict holds float32[num_clients] sums per client: ``loss_sum``
    (softmax cross-entropy), ``num_correct`` and ``num_examples``.

    Args:
      apply_fn: ``(params, inputs, rng, train) -> logits``, called with
        ``rng=None, train=False``.
      clients_per_chunk: clients evaluated together under one vmap; None
        evaluates all at once.
    """

    @jax.jit
    def evaluate(params, batches: ClientEvalBatches):
        def per_client(batch):
            return classification_sums(apply_fn, params, *batch)

        if clients_per_chunk is None:
            return jax.vmap(per_client)(tuple(batches))
        # lax.map with batch_size: a loop over chunks, each chunk vmapped.
        return jax.lax.map(per_client, tuple(batches), batch_size=clients_per_chunk)

    return evaluate


def per_client_record(sums: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The metrics record fields of one per-client evaluation."""
    counts = np.asarray(sums["num_examples"], np.float64)
    accuracy = np.asarray(sums["num_correct"], np.float64) / counts
    loss = np.asarray(sums["loss_sum"], np.float64) / counts
    record = {f"client_accuracy_{k}": v for k, v in client_distribution(accuracy).items()}
    record["client_loss_mean"] = float(loss.mean())
    record["num_eval_clients"] = int(counts.size)
    return record
