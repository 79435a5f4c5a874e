"""Float64 NumPy references, synthetic clients and a round harness, importable by users' tests."""

from fedjaxsim.testing.clients import synthetic_clients
from fedjaxsim.testing.harness import client_store, run_round, run_rounds
from fedjaxsim.testing.references import (
    LeastSquaresProblem,
    adam_reference,
    least_squares_problem,
    softmax_fedavg_round_reference,
    softmax_loss_and_grad,
)

__all__ = [
    "LeastSquaresProblem",
    "adam_reference",
    "client_store",
    "least_squares_problem",
    "run_round",
    "run_rounds",
    "softmax_fedavg_round_reference",
    "softmax_loss_and_grad",
    "synthetic_clients",
]
