"""Differential privacy and secure aggregation for federated rounds.

* :mod:`fedjaxsim.privacy.dp`: DP-FedAvg (McMahan et al. 2018) as an
  aggregator for any algorithm: per-client clipping of the whole message,
  Gaussian noise on the sum, fixed-denominator estimator, adaptive clipping
  (Andrew et al. 2021), ``noise_cohort_size``; and DP-FTRL (Kairouz et al.
  2021): ``mechanism="tree"``, tree-aggregated noise restarted every
  ``tree_size`` rounds (:func:`~fedjaxsim.privacy.dp.tree_noise_increment`).
* :mod:`fedjaxsim.privacy.accounting`: epsilon with ``dp-accounting`` (RDP and
  PLD) for the sampler and mechanism actually used (fixed-size or Poisson
  sampling with the Gaussian, shuffling with the tree; no default sampler),
  their adjacency, per-round schedules, and the noise multiplier for a target
  epsilon. Not imported here: it needs the ``privacy`` extra
  (``pip install 'fedjaxsim[privacy]'``).
* :mod:`fedjaxsim.privacy.secure_aggregation`: pairwise-mask secure
  aggregation (Bonawitz et al. 2017) in modular arithmetic, with dropouts.
"""

from fedjaxsim.privacy.dp import (
    AdaptiveClipping,
    DpAggregatorState,
    EpsilonSchedule,
    add_gaussian_noise,
    clip_by_global_norm,
    dp_fed_avg,
    dp_fed_avg_aggregator,
    tree_noise_increment,
    update_noise_multiplier,
)
from fedjaxsim.privacy.secure_aggregation import (
    SecureAggregatorState,
    mask_inputs,
    quantize_to_fixed_point,
    secure_aggregator,
    unmask_sum,
)

__all__ = [
    "AdaptiveClipping",
    "DpAggregatorState",
    "EpsilonSchedule",
    "SecureAggregatorState",
    "add_gaussian_noise",
    "clip_by_global_norm",
    "dp_fed_avg",
    "dp_fed_avg_aggregator",
    "mask_inputs",
    "quantize_to_fixed_point",
    "secure_aggregator",
    "tree_noise_increment",
    "unmask_sum",
    "update_noise_multiplier",
]
