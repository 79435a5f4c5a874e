"""fedjaxsim: federated learning simulation in JAX, with clients on an array axis.

The functional API: build an :class:`~fedjaxsim.core.algorithm.Algorithm`
(``fed_avg``, ``scaffold`` and the rest, or your own record of pure
functions), optionally swap its aggregator
(:func:`~fedjaxsim.core.algorithm.with_aggregator`: DP, robust rules,
compression, secure aggregation), pack a cohort on the host with
:func:`~fedjaxsim.core.packing.pack_cohort`, and run the jitted round of
:func:`~fedjaxsim.core.engine.round.build_round`.
"""

from fedjaxsim.algorithms.ditto import ditto
from fedjaxsim.algorithms.fed_avg import (
    fed_adagrad,
    fed_adam,
    fed_avg,
    fed_avg_m,
    fed_sgd_avg,
    fed_yogi,
)
from fedjaxsim.algorithms.fed_nova import fed_nova
from fedjaxsim.algorithms.fed_prox import fed_prox
from fedjaxsim.algorithms.mime_lite import mime_lite
from fedjaxsim.algorithms.q_ffl import q_ffl
from fedjaxsim.algorithms.scaffold import scaffold
from fedjaxsim.core.aggregators import (
    Aggregate,
    Aggregator,
    ClientPayload,
    Contribution,
    aggregate_clients,
    weighted_mean,
)
from fedjaxsim.core.algorithm import Algorithm, ClientOutput, with_aggregator
from fedjaxsim.core.client_batch import Cohort
from fedjaxsim.core.client_state import ClientStateStore
from fedjaxsim.core.engine import ExecutionPlan, RoundOutput, build_round, default_plan
from fedjaxsim.core.evaluation import batch_for_eval, build_classification_eval, build_task_eval
from fedjaxsim.core.losses import classification_loss, masked_mean_loss, squared_error_loss
from fedjaxsim.core.packing import PackingConfig, default_num_lanes, pack_cohort
from fedjaxsim.core.sampling import sample_uniform
from fedjaxsim.core.sharding import client_mesh, shard_cohort
from fedjaxsim.core.tasks import Task, task_loss
from fedjaxsim.models import get_model
from fedjaxsim.privacy.dp import dp_fed_avg

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "Aggregator",
    "Algorithm",
    "ClientOutput",
    "ClientPayload",
    "ClientStateStore",
    "Cohort",
    "Contribution",
    "ExecutionPlan",
    "PackingConfig",
    "RoundOutput",
    "Task",
    "aggregate_clients",
    "batch_for_eval",
    "build_classification_eval",
    "build_task_eval",
    "build_round",
    "classification_loss",
    "client_mesh",
    "default_num_lanes",
    "default_plan",
    "ditto",
    "dp_fed_avg",
    "fed_adagrad",
    "fed_adam",
    "fed_avg",
    "fed_avg_m",
    "fed_nova",
    "fed_prox",
    "fed_sgd_avg",
    "fed_yogi",
    "get_model",
    "masked_mean_loss",
    "mime_lite",
    "pack_cohort",
    "q_ffl",
    "sample_uniform",
    "scaffold",
    "shard_cohort",
    "squared_error_loss",
    "task_loss",
    "weighted_mean",
    "with_aggregator",
]
