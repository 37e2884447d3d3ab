"""The simulation path of `make demo`, for real: a simulation SuperLink, `flwr run`, Ray.

Runs the satellite federation, which differs from the medical demo only in its run_config
(``domain="satellite" in-channels=4``): two sites, two rounds, tiny model.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedmoco.checkpoint import load_checkpoint
from fedmoco.pretrain import model_from_checkpoint
from server.simulation import DEMO_CHANNELS, make_demo_sites, run_simulation
from server.strategy import load_server_state

pytestmark = pytest.mark.slow


def test_satellite_simulation_end_to_end(tmp_path):
    data = tmp_path / "data"
    make_demo_sites("satellite", data, 2, image_size=32)
    run = {"domain": "satellite", "in-channels": DEMO_CHANNELS["satellite"], "image-size": 32,
           "num-server-rounds": 2, "demo-root": str(data), "out-dir": str(tmp_path / "server"), "min-nodes": 2,
           "batch-size": 16, "max-steps-per-epoch": 2, "dim": 32, "hidden-dim": 64, "key-sample-rate": 0.2,
           "key-release": "prototypes",  # the sharing path, end to end (the default is none)
           # federation units: with each site's own statistics a satellite site refuses to share (status 9)
           "input-mean": "0.08,0.09,0.09,0.2", "input-std": "0.04,0.05,0.09,0.15"}
    result = run_simulation(run, num_supernodes=2, work_dir=tmp_path, timeout=240, echo=False)
    ckpt = load_checkpoint(result.encoder)
    assert ckpt["data"]["domain"] == "satellite" and ckpt["moco_config"]["in_channels"] == 4
    model = model_from_checkpoint(ckpt, result.encoder)
    assert model.features(torch.zeros(2, 4, 32, 32)).shape == (2, 128)
    state = load_server_state(tmp_path / "server" / "server-state.pt")
    assert state["round"] == 2
    # Simulated sites have no node_config of their own (Flower sets only partition-id): their
    # budget and ledger come from the fedmoco-site.toml make_demo_sites wrote (docs/privacy.md).
    rounds = [json.loads(line) for line in (tmp_path / "server" / "rounds.jsonl").read_text().splitlines()]
    # A release reads one tile per raster (the unit a site adds or removes): a demo site's 6
    # rasters rarely lift a prototype above the noise, so the queue may stay empty here.
    assert all([s["dp-status"] for s in r["sites"]] == [0, 0] for r in rounds)
    assert state["queue"]["count"] == rounds[-1]["queue-size"]
    assert all((tmp_path / "site-state" / f"site-{i}" / "privacy-ledger.json").is_file() for i in range(2))
    assert (tmp_path / "server" / "plots" / "loss.png").is_file()
    log = result.log.read_text(errors="replace")
    assert "round 2: 2/2 replies accepted" in log


def test_the_timeout_stops_a_run_that_is_still_going(tmp_path):
    import os
    import time

    from server.launch import descendants

    data = tmp_path / "data"
    make_demo_sites("satellite", data, 1, image_size=32)
    run = {"domain": "satellite", "in-channels": DEMO_CHANNELS["satellite"], "image-size": 32,
           "num-server-rounds": 50, "demo-root": str(data), "out-dir": str(tmp_path / "server"), "min-nodes": 1,
           "batch-size": 16, "dim": 32, "hidden-dim": 64}
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not finish within --timeout 15 s and was stopped"):
        run_simulation(run, num_supernodes=1, work_dir=tmp_path, timeout=15, echo=False)
    assert time.monotonic() - started < 60  # 50 rounds would take minutes
    assert not descendants(os.getpid())  # nothing it started is left running
