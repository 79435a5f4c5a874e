"""2 and 8 CPU devices give the parameters of 1 device (subprocess with 8 devices),
for a model and for LoRA adapters over a frozen, replicated GPT-2 base."""

import json
import os
import subprocess
import sys
from pathlib import Path

CHECK = Path(__file__).with_name("multi_device_check.py")


def test_one_two_and_eight_devices_agree():
    environment = dict(os.environ)
    environment["XLA_FLAGS"] = (
        environment.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    result = subprocess.run(
        [sys.executable, str(CHECK)],
        capture_output=True,
        text=True,
        check=False,
        env=environment,
        timeout=600,
        cwd=CHECK.parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["moved"] > 1e-2  # training really moved the model
    assert len(payload["report"]) == 7
    for name, entry in payload["report"].items():
        assert entry["examples_equal"], name
        assert entry["max_difference"] < 2e-6, (name, entry)
