"""A synthetic look-alike of federated EMNIST-62, in plain NumPy.

It is shared by our throughput benchmark and the FedJAX baseline, which runs in
its own virtual environment (jax 0.4.30, numpy<2), so it must not import
fedjaxsim or anything beyond NumPy.

Client sizes follow the real EMNIST-62 train split (3,400 writers, mean 197.5
examples, standard deviation about 80, between 10 and 480). Pixels are uniform
random in [0, 1) with shape 28x28x1 and labels are uniform over 62 classes.
Clients are generated lazily and deterministically from (seed, client id), so
the whole population never has to be in memory.
"""

from __future__ import annotations

import numpy as np

NUM_CLIENTS = 3400
NUM_CLASSES = 62
MEAN_EXAMPLES = 197.5
SD_EXAMPLES = 80.0
MIN_EXAMPLES = 10
MAX_EXAMPLES = 480
IMAGE_SHAPE = (28, 28, 1)


def client_sizes(num_clients: int = NUM_CLIENTS, seed: int = 0) -> np.ndarray:
    """Returns int64[num_clients] example counts, clipped normal like EMNIST."""
    rng = np.random.default_rng([seed, 2**31 - 1])
    sizes = np.rint(rng.normal(MEAN_EXAMPLES, SD_EXAMPLES, size=num_clients))
    return np.clip(sizes, MIN_EXAMPLES, MAX_EXAMPLES).astype(np.int64)


class EmnistLookalike:
    """Lazily generated federated population.

    Args:
      num_clients: population size.
      seed: seeds both the sizes and every client's examples.
    """

    def __init__(self, num_clients: int = NUM_CLIENTS, seed: int = 0):
        self.num_clients = num_clients
        self.seed = seed
        self.sizes = client_sizes(num_clients, seed)

    def client(self, client_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (float32[n, 28, 28, 1] pixels, int32[n] labels) of one client."""
        if not 0 <= client_id < self.num_clients:
            raise ValueError(
                f"client_id {client_id} is outside [0, {self.num_clients})"
            )
        rng = np.random.default_rng([self.seed, int(client_id)])
        n = int(self.sizes[client_id])
        pixels = rng.random((n, *IMAGE_SHAPE), dtype=np.float32)
        labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
        return pixels, labels

    def cohort_ids(self, round_index: int, cohort_size: int) -> np.ndarray:
        """Uniform sample without replacement, deterministic from (seed, round)."""
        rng = np.random.default_rng([self.seed, 7, int(round_index)])
        return np.sort(rng.choice(self.num_clients, size=cohort_size, replace=False))
