"""The algorithm library: one module per paper, each a builder of an Algorithm.

FedAvg and its adaptive-server family (Reddi et al. 2020 EMNIST defaults:
client lr 10^-1.5; FedAdam/FedYogi server lr 10^-2.5, eps 10^-4; FedAdagrad
server lr 10^-1, eps 10^-2; FedAvgM server lr 10^-0.5, momentum 0.9) come
from :mod:`fedjaxsim.algorithms.fed_avg`. Stateful algorithms (SCAFFOLD,
Ditto) keep per-client state in a
:class:`fedjaxsim.core.client_state.ClientStateStore` whose default comes from
their module's ``initial_client_state`` (re-exported here as
``scaffold_initial_client_state`` and ``ditto_initial_client_state``).

The builders are exported under their papers' names, which are also their
modules' names: ``fedjaxsim.algorithms.scaffold`` is the builder, and module
members are imported with ``from fedjaxsim.algorithms.scaffold import ...``.
"""

from fedjaxsim.algorithms.ditto import DittoClientState, DittoServerState, ditto
from fedjaxsim.algorithms.ditto import initial_client_state as ditto_initial_client_state
from fedjaxsim.algorithms.fed_avg import (
    ServerState,
    fed_adagrad,
    fed_adam,
    fed_avg,
    fed_avg_m,
    fed_sgd_avg,
    fed_yogi,
)
from fedjaxsim.algorithms.fed_nova import FedNovaServerState, fed_nova
from fedjaxsim.algorithms.fed_prox import fed_prox
from fedjaxsim.algorithms.mime_lite import MimeLiteServerState, mime_lite
from fedjaxsim.algorithms.personalization import (
    ClientDistribution,
    build_personalized_evaluation,
    pack_for_personalization,
    summarize_over_clients,
)
from fedjaxsim.algorithms.q_ffl import QFflServerState, q_ffl
from fedjaxsim.algorithms.scaffold import ScaffoldClientState, ScaffoldServerState, scaffold
from fedjaxsim.algorithms.scaffold import initial_client_state as scaffold_initial_client_state

__all__ = [
    "ClientDistribution",
    "DittoClientState",
    "DittoServerState",
    "FedNovaServerState",
    "MimeLiteServerState",
    "QFflServerState",
    "ScaffoldClientState",
    "ScaffoldServerState",
    "ServerState",
    "build_personalized_evaluation",
    "ditto",
    "ditto_initial_client_state",
    "fed_adagrad",
    "fed_adam",
    "fed_avg",
    "fed_avg_m",
    "fed_nova",
    "fed_prox",
    "fed_sgd_avg",
    "fed_yogi",
    "mime_lite",
    "pack_for_personalization",
    "q_ffl",
    "scaffold",
    "scaffold_initial_client_state",
    "summarize_over_clients",
]
