"""FedAvg on the embedded federated digits (no network needed).

Equivalent to ``fedjaxsim run``; every option of that command works here:

    python scripts/run_fedavg.py --rounds 100 --model dense --output-dir runs/dense
"""

import sys

from fedjaxsim.runner.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
