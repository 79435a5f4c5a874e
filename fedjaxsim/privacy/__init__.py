"""Differential privacy and secure aggregation for federated rounds.

* :mod:`fedjaxsim.privacy.dp`: DP-FedAvg (McMahan et al. 2018) as an
  aggregator for any algorithm: per-client clipping of the whole message,
  Gaussian noise on the sum, fixed-denominator estimator, adaptive clipping
  (Andrew et al. 2021), ``noise_cohort_size``.
* :mod:`fedjaxsim.privacy.accounting`: epsilon with ``dp-accounting`` (RDP and
  PLD) for the sampler actually used (Poisson or fixed-size, no default),
  per-round schedules, and the noise multiplier for a target epsilon. Needs the ``privacy`` extra
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
    "unmask_sum",
    "update_noise_multiplier",
]
