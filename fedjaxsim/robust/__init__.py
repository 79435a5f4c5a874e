"""Byzantine-robust aggregation and attack simulations.

* :mod:`fedjaxsim.robust.aggregators`: coordinate-wise median and trimmed mean
  (Yin et al. 2018), Krum and Multi-Krum (Blanchard et al. 2017), norm
  bounding (Sun et al. 2019); each an
  :class:`~fedjaxsim.core.aggregators.Aggregator` for any algorithm
  (``fedjaxsim.core.algorithm.with_aggregator``).
* :mod:`fedjaxsim.robust.attacks`: sign flipping, scaled model replacement
  (Bagdasaryan et al. 2020) and label flipping (Tolpegin et al. 2020) by a
  fixed set of malicious clients, via :func:`~fedjaxsim.robust.attacks.with_attack`.
"""

from fedjaxsim.robust.aggregators import (
    coordinate_median,
    krum,
    multi_krum,
    norm_bounded_mean,
    pairwise_squared_distances,
    trimmed_mean,
)
from fedjaxsim.robust.attacks import (
    Attack,
    AttackClientState,
    attack_client_states,
    choose_malicious_clients,
    combine,
    label_flip,
    model_replacement,
    sign_flip,
    with_attack,
)

__all__ = [
    "Attack",
    "AttackClientState",
    "attack_client_states",
    "choose_malicious_clients",
    "combine",
    "coordinate_median",
    "krum",
    "label_flip",
    "model_replacement",
    "multi_krum",
    "norm_bounded_mean",
    "pairwise_squared_distances",
    "sign_flip",
    "trimmed_mean",
    "with_attack",
]
