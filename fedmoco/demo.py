"""``make demo``: a federated MoCo run of three generated hospitals, then evaluation.

1. the coordinator's job: a Flower simulation (own SuperLink, offline) in which three
   hospitals, each with its own generated DICOM archive, pretrain a tiny encoder together
   for a few rounds, sharing weights and DP-noised keys only;
2. the data scientist's job: kNN and a linear probe of the aggregated encoder on a
   separate labelled archive (one folder per phantom type).

Everything is generated locally under ``demo-output/`` (no downloads) and sized to finish
in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fedmoco.cli import main as cli

OUT = Path("demo-output")


def main() -> int:
    from server.simulation import main as simulate

    start = time.perf_counter()
    federation = OUT / "federation"
    rc = simulate(["--domain", "medical", "--sites", "3", "--rounds", "3", "--out", str(federation)])
    if rc:
        return rc
    encoder = federation / "server" / "encoder.pt"
    labelled = OUT / "labelled-hospital"
    if not labelled.exists():
        cli(["make-demo-data", "--domain", "medical", "--labelled", "--seed", "99", "--out", str(labelled)])
    print("\nevaluating the aggregated encoder on a labelled archive it never saw:")
    for command in (["knn"], ["linear-probe", "--epochs", "50"]):
        rc = cli(["-q", *command, "--checkpoint", str(encoder), "--data", str(labelled),
                  "--out", str(federation / "eval")])
        if rc:
            return rc
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; aggregated encoder: {encoder.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
