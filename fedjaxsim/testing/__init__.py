"""Float64 NumPy references, synthetic clients and a round harness, importable by users' tests.

The references (``references.py`` for FedAvg and the server optimizers,
``algorithm_references.py`` for the other algorithms) are loops written from
the papers; nothing in them imports the engine.
"""

from fedjaxsim.testing.clients import synthetic_clients
from fedjaxsim.testing.harness import client_store, run_round, run_rounds
from fedjaxsim.testing.references import (
    BiasCorrectedYogi,
    LeastSquaresProblem,
    ReddiAdaptiveServer,
    RoundSchedule,
    ServerSgd,
    adam_reference,
    fed_avg_round,
    least_squares_problem,
    local_sgd,
    softmax_fedavg_round_reference,
    softmax_loss_and_grad,
)

__all__ = [
    "BiasCorrectedYogi",
    "LeastSquaresProblem",
    "ReddiAdaptiveServer",
    "RoundSchedule",
    "ServerSgd",
    "adam_reference",
    "client_store",
    "fed_avg_round",
    "least_squares_problem",
    "local_sgd",
    "run_round",
    "run_rounds",
    "softmax_fedavg_round_reference",
    "softmax_loss_and_grad",
    "synthetic_clients",
]
