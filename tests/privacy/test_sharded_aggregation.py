"""DP (Gaussian and tree noise), secure aggregation and Krum: one round, 8 devices or one."""

import json
import os
import subprocess
import sys
from pathlib import Path

CHECK = Path(__file__).with_name("sharded_aggregation_check.py")


def test_privacy_robust_and_compression_aggregators_agree_on_eight_devices():
    environment = dict(os.environ)
    environment["XLA_FLAGS"] = (
        environment.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    result = subprocess.run(
        [sys.executable, str(CHECK)],
        check=False,
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
        cwd=CHECK.parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"dp_fed_avg", "dp_ftrl", "secure", "krum"}
    for name, entry in report.items():
        assert entry["moved"] > 1e-3, name  # the round really changed the model
        assert entry["metrics_equal"], name
        assert entry["max_difference"] < 2e-6, (name, entry)
    # The features under test really ran: noise, and clients that dropped out.
    assert report["dp_fed_avg"]["metrics"]["dp_noise_stddev_on_sum"] > 0
    assert report["dp_ftrl"]["metrics"]["dp_noise_stddev_on_sum"] > 0
    assert report["dp_ftrl"]["metrics"]["dp_tree_round"] == 1
    assert report["secure"]["metrics"]["secagg_num_dropped"] > 0
    assert report["secure"]["metrics"]["secagg_aborted"] == 0
