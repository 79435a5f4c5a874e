"""Synthetic look-alikes of the benchmark suite's populations (Reddi et al. 2021).

Throughput depends on shapes, client sizes and the vocabulary, not on what
the tokens say, so each look-alike draws random ids or pixels with the
published population's client count and a client-size distribution matched to
its published totals. Clients are generated lazily and deterministically from
(seed, client id).

* ``shakespeare``: 715 clients (TFF's train split). TFF publishes 16,068
  snippets; the LEAF source holds about 3.7M characters over these roles, so a
  client averages about 65 sequences of 80 characters. Sizes are log-normal
  with that mean (sigma 1.2), clipped to [1, 2,000] sequences. Vocabulary 90.
* ``stackoverflow_nwp``: 342,477 clients and 135,818,730 sentences (TFF's
  train split), a mean of 396.6; log-normal sizes with that mean (sigma 1.5),
  clipped to [1, 50,000]. Reddi et al. train on at most 256 per client, which
  the benchmark applies as a step cap. Sequences of 20, vocabulary 10,004.
* ``fed_cifar100``: 500 clients of exactly 100 images (TFF's train split),
  uint8 32x32x3, 100 classes.
"""

from __future__ import annotations

import numpy as np


class Lookalike:
    """A lazily generated population: ``client(i)`` returns ``{"x", "y"}`` NumPy arrays."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    input_dtype: np.dtype

    def __init__(self, num_clients: int, sizes: np.ndarray, seed: int):
        self.num_clients = num_clients
        self.sizes = sizes
        self.seed = seed

    def cohort_ids(self, round_index: int, cohort_size: int) -> np.ndarray:
        """Uniform sample without replacement, deterministic from (seed, round)."""
        rng = np.random.default_rng([self.seed, 7, int(round_index)])
        return np.sort(rng.choice(self.num_clients, size=cohort_size, replace=False))

    def _rng(self, client_id: int) -> np.random.Generator:
        if not 0 <= client_id < self.num_clients:
            raise ValueError(f"client_id {client_id} is outside [0, {self.num_clients})")
        return np.random.default_rng([self.seed, int(client_id)])

    def sample_input(self) -> np.ndarray:
        return np.zeros((1, *self.input_shape), self.input_dtype)


def _lognormal_sizes(num_clients, mean, sigma, low, high, seed) -> np.ndarray:
    rng = np.random.default_rng([seed, 2**31 - 1])
    mu = np.log(mean) - sigma**2 / 2  # E[exp(N(mu, sigma^2))] = mean
    sizes = np.rint(rng.lognormal(mu, sigma, size=num_clients))
    return np.clip(sizes, low, high).astype(np.int64)


class TokenLookalike(Lookalike):
    """Next-token sequences: ``x`` and ``y`` int32[n, length], y the shifted x."""

    def __init__(self, name, num_clients, sizes, length, vocab, seed=0):
        super().__init__(num_clients, sizes, seed)
        self.name, self.num_classes = name, vocab
        self.input_shape, self.input_dtype = (length,), np.dtype(np.int32)

    def client(self, client_id: int) -> dict[str, np.ndarray]:
        rng = self._rng(client_id)
        n, length = int(self.sizes[client_id]), self.input_shape[0]
        ids = rng.integers(1, self.num_classes, size=(n, length + 1)).astype(np.int32)
        # A real sequence ends early about a third of the time: pad its tail.
        ends = rng.integers(length // 2, length + 1, size=n)
        ids[np.arange(length + 1)[None, :] > ends[:, None]] = 0
        return {"x": ids[:, :-1], "y": ids[:, 1:]}


class ImageLookalike(Lookalike):
    def __init__(self, name, num_clients, sizes, shape, num_classes, seed=0):
        super().__init__(num_clients, sizes, seed)
        self.name, self.num_classes = name, num_classes
        self.input_shape, self.input_dtype = shape, np.dtype(np.float32)

    def client(self, client_id: int) -> dict[str, np.ndarray]:
        rng = self._rng(client_id)
        n = int(self.sizes[client_id])
        pixels = rng.integers(0, 256, size=(n, *self.input_shape), dtype=np.uint8)
        labels = rng.integers(0, self.num_classes, size=n).astype(np.int32)
        return {"x": pixels.astype(np.float32) / 255.0, "y": labels}


def shakespeare(seed: int = 0) -> TokenLookalike:
    sizes = _lognormal_sizes(715, 65.0, 1.2, 1, 2_000, seed)
    return TokenLookalike("shakespeare", 715, sizes, 80, 90, seed)


def stackoverflow_nwp(seed: int = 0) -> TokenLookalike:
    sizes = _lognormal_sizes(342_477, 396.6, 1.5, 1, 50_000, seed)
    return TokenLookalike("stackoverflow_nwp", 342_477, sizes, 20, 10_004, seed)


def fed_cifar100(seed: int = 0) -> ImageLookalike:
    return ImageLookalike("fed_cifar100", 500, np.full(500, 100, np.int64), (32, 32, 3), 100, seed)


# Model -> (workload, batch size and local step cap of Reddi et al.'s protocol).
WORKLOADS = {
    "char_lstm": (shakespeare, 4, None),
    "transformer": (stackoverflow_nwp, 16, 16),
    "word_lstm": (stackoverflow_nwp, 16, 16),
    "resnet18": (fed_cifar100, 20, None),
}
