"""Faults that must not lose the run, on the real ServerApp code and real ClientApp handlers.

The sites run in this process (``server.inprocess.InProcessGrid``): each round every site's
handler gets a copy of its message and keeps its Context, as under a SuperNode, and a handler
that raises becomes an error reply, as in Flower's runtime.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message

from clients.app import app as client_app
from clients.task import RUN_DEFAULTS
from fedmoco.checkpoint import load_checkpoint
from fedmoco.pretrain import model_from_checkpoint
from server.app import run_federation
from server.inprocess import InProcessGrid, make_context
from server.strategy import FedMoCo, load_server_state

RUN = {**RUN_DEFAULTS, "arch": "tiny", "dim": 16, "hidden-dim": 32, "image-size": 32, "local-queue-size": 64,
       "batch-size": 8, "max-steps-per-epoch": 2, "domain": "images", "key-sample-rate": 0.5, "max-keys": 32,
       "input-mean": "0.5", "input-std": "0.25",  # fixed units: an images site shares only with them
       "queue-sample": 64, "global-queue-size": 256, "max-update-norm": 1000.0, "plots": False,
       "key-release": "prototypes"}


@pytest.fixture(scope="module")
def sites_root(tmp_path_factory) -> Path:
    from domains.images import make_demo_images

    root = tmp_path_factory.mktemp("sites")
    for i in range(4):
        make_demo_images(root / f"site-{i}", n_per_class=5, size=32, seed=i, rgb=False)
    return root


def run_config(tmp_path: Path, sites_root: Path, **over) -> dict:
    return {**RUN, "demo-root": str(sites_root), "out-dir": str(tmp_path / "server"), **over}


def rounds(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def statuses(record: dict) -> dict[int, str]:
    return {s["node"]: s["status"] for s in record["sites"]}


class Faulty:
    """The real ClientApp, with a fault injected into its reply in some rounds."""

    def __init__(self, fault: str, rounds: set[int]) -> None:
        self.fault, self.rounds = fault, rounds

    def __call__(self, msg: Message, ctx) -> Message:
        r = int(msg.content["config"]["server-round"])
        reply = client_app(msg, ctx)
        if r not in self.rounds:
            return reply
        if self.fault == "raise":
            raise RuntimeError("simulated crash in the middle of local training")
        arrays: ArrayRecord = reply.content["arrays"]
        name = "encoder_q.head.2.weight"
        if self.fault == "nan":
            w = arrays[name].numpy().copy()
            w[0, 0] = np.nan
            arrays[name] = Array(w)
        elif self.fault == "shape":
            arrays[name] = Array(np.ascontiguousarray(arrays[name].numpy().T))
        elif self.fault == "key-dim":
            k = torch.nn.functional.normalize(torch.randn(5, 17), dim=1).numpy()
            reply.content["keys"] = ArrayRecord({"keys": Array(k)})
        return reply


def test_faulty_sites_are_dropped_and_the_run_completes(tmp_path, sites_root, caplog):
    run = run_config(tmp_path, sites_root, **{"num-server-rounds": 3, "min-nodes": 4})
    handlers = {
        100: client_app,
        101: Faulty("raise", {2}),
        102: Faulty("nan", {1}),
        103: Faulty("key-dim", {1, 2, 3}),
    }
    grid = InProcessGrid({n: (h, make_context(n, {"partition-id": n - 100}, run)) for n, h in handlers.items()})
    with caplog.at_level(logging.WARNING, logger="flwr.fedmoco.server"):
        result = run_federation(grid, run)
    assert result.rounds_done == 3
    recs = rounds(result.out_dir)
    assert [r["round"] for r in recs] == [1, 2, 3]
    assert statuses(recs[0]) == {100: "accepted", 101: "accepted", 102: "rejected", 103: "rejected"}
    assert statuses(recs[1]) == {100: "accepted", 101: "error", 102: "accepted", 103: "rejected"}
    assert statuses(recs[2]) == {100: "accepted", 101: "accepted", 102: "accepted", 103: "rejected"}
    assert all(r["updated"] for r in recs)
    text = caplog.text
    assert "round 1: rejected reply from site-2 (node 102): arrays 'encoder_q.head.2.weight' has 1 non-finite value(s)" in text
    assert "round 2: site-1 (node 101) sent no update (code 2): <class 'RuntimeError'>:<'simulated crash" in text
    assert "round 1: rejected reply from site-3 (node 103): keys 'keys' has shape (5, 17), expected (n, 16)" in text
    # the site that crashed lost its round, not its state: its Context is as after round 1
    assert grid.sites[101][1].state["fedmoco.site"]["rounds-done"] == 2  # rounds 1 and 3
    # nothing from the bad replies reached the queue, and the model is finite
    state = load_server_state(result.state)
    owners = set(state["queue"]["sites"][i] for i in state["queue"]["owner"][: state["queue"]["count"]].tolist())
    assert 103 not in owners and owners <= {100, 101, 102}
    assert all(torch.isfinite(v).all() for v in state["arrays"].values())
    model = model_from_checkpoint(load_checkpoint(result.encoder), result.encoder)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_wrong_shapes_rejected_and_min_replies_keeps_the_model(tmp_path, sites_root, caplog):
    run = run_config(tmp_path, sites_root, **{"num-server-rounds": 2, "min-nodes": 2, "min-replies": 2})
    handlers = {100: client_app, 101: Faulty("shape", {2})}
    grid = InProcessGrid({n: (h, make_context(n, {"partition-id": n - 100}, run)) for n, h in handlers.items()})
    with caplog.at_level(logging.WARNING, logger="flwr.fedmoco.server"):
        result = run_federation(grid, run)
    recs = rounds(result.out_dir)
    assert statuses(recs[1])[101] == "rejected" and recs[1]["updated"] is False
    assert "has shape (32, 16), expected (16, 32)" in caplog.text
    assert "fewer than min-replies 2" in caplog.text
    after_1 = load_server_state(result.state)["arrays"]
    assert result.rounds_done == 2
    # round 2 changed nothing: the checkpoint of round 2 holds round 1's model
    assert recs[0]["updated"] and all(torch.isfinite(v).all() for v in after_1.values())


def test_a_stopped_server_resumes_at_round_2_with_the_same_queue(tmp_path, sites_root, monkeypatch):
    run = run_config(tmp_path, sites_root, **{"num-server-rounds": 3, "min-nodes": 2})
    # sites that share DP summaries: their own budget and ledger (docs/privacy.md)
    contexts = {n: make_context(n, {"partition-id": n - 100, "dp-epsilon": 8.0,
                                    "ledger-path": str(tmp_path / f"ledger-{n}.json")}, run) for n in (100, 101)}
    crashing = InProcessGrid({n: (client_app, c) for n, c in contexts.items()}, fail_on_round=2)
    with pytest.raises(KeyboardInterrupt):
        run_federation(crashing, run)
    saved = load_server_state(Path(run["out-dir"]) / "server-state.pt")
    assert saved["round"] == 1 and saved["queue"]["count"] > 0

    seen = {}
    original = FedMoCo.configure_train

    def spy(self, server_round, arrays, config, grid):
        messages = original(self, server_round, arrays, config, grid)
        if not seen:
            seen.update(queue=self.queue.state_dict(), arrays={k: a.numpy().copy() for k, a in arrays.items()},
                        rounds={m.content["config"]["server-round"] for m in messages})
        return messages

    monkeypatch.setattr(FedMoCo, "configure_train", spy)
    restarted = InProcessGrid({n: (client_app, c) for n, c in contexts.items()})  # the sites kept running
    result = run_federation(restarted, run)
    assert result.resumed_from == 1 and result.rounds_done == 3
    assert torch.equal(seen["queue"]["keys"], saved["queue"]["keys"])
    assert seen["queue"]["count"] == saved["queue"]["count"] and seen["queue"]["sites"] == saved["queue"]["sites"]
    assert all(np.array_equal(seen["arrays"][k], v.numpy()) for k, v in saved["arrays"].items())
    # the first messages after the restart are round 2's, and every round is logged once
    assert seen["rounds"] == {2} and restarted.calls == 2
    assert [r["round"] for r in rounds(result.out_dir)] == [1, 2, 3]
    assert load_server_state(result.state)["round"] == 3
