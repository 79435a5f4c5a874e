"""FedAvg on the embedded federated digits (no network needed).

Equivalent to ``fedjaxsim run``; every option of that command works here,
including config files and single-key overrides:

    python scripts/run_fedavg.py --rounds 100 --model dense --output-dir runs/dense
    python scripts/run_fedavg.py --config configs/emnist_fedadam.yaml --training.rounds 10
"""

import sys

from fedjaxsim.runner.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
