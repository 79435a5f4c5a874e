"""The algorithm library: one module per paper, each with a builder of an Algorithm.

Modules are named after their builders (``fedjaxsim.algorithms.scaffold``
defines ``scaffold``); import a builder from its module or from the top-level
package (``from fedjaxsim import scaffold``). FedAvg and its adaptive-server
family (Reddi et al. 2020 EMNIST defaults: client lr 10^-1.5; FedAdam/FedYogi
server lr 10^-2.5, tau 10^-4; FedAdagrad server lr 10^-1, tau 10^-2; FedAvgM
server lr 10^-0.5, momentum 0.9) come from :mod:`fedjaxsim.algorithms.fed_avg`.
Stateful algorithms (SCAFFOLD, Ditto) declare ``Algorithm.initial_client_state``,
the default of the :class:`fedjaxsim.core.client_state.ClientStateStore` that
keeps their per-client state.
"""

from fedjaxsim.algorithms import (
    ditto,
    fed_avg,
    fed_buff,
    fed_nova,
    fed_prox,
    mime_lite,
    personalization,
    q_ffl,
    scaffold,
)

__all__ = [
    "ditto",
    "fed_avg",
    "fed_buff",
    "fed_nova",
    "fed_prox",
    "mime_lite",
    "personalization",
    "q_ffl",
    "scaffold",
]
