"""fedjaxsim: federated learning simulation in JAX, with clients on an array axis.

The functional API: build an :class:`Algorithm` (``fed_avg`` and friends, or
your own record of pure functions), pack a cohort on the host with
:func:`pack_cohort`, and run :func:`build_round`'s jitted round.
"""

from fedjaxsim.algorithms.fed_avg import (
    fed_adagrad,
    fed_adam,
    fed_avg,
    fed_avg_m,
    fed_sgd_avg,
    fed_yogi,
    masked_mean_loss,
)
from fedjaxsim.core.aggregators import Aggregator, weighted_mean
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.client_batch import Cohort
from fedjaxsim.core.engine import ExecutionPlan, RoundOutput, build_round, default_plan
from fedjaxsim.core.evaluation import batch_for_eval, build_classification_eval
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.core.sampling import sample_uniform
from fedjaxsim.core.sharding import client_mesh, shard_cohort

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "Algorithm",
    "ClientOutput",
    "Cohort",
    "ExecutionPlan",
    "PackingConfig",
    "RoundOutput",
    "batch_for_eval",
    "build_classification_eval",
    "build_round",
    "client_mesh",
    "default_plan",
    "fed_adagrad",
    "fed_adam",
    "fed_avg",
    "fed_avg_m",
    "fed_sgd_avg",
    "fed_yogi",
    "masked_mean_loss",
    "pack_cohort",
    "sample_uniform",
    "shard_cohort",
    "weighted_mean",
]
