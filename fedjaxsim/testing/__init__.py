"""Float64 NumPy references and toy problems, importable by users' tests."""

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
    "least_squares_problem",
    "softmax_fedavg_round_reference",
    "softmax_loss_and_grad",
]
