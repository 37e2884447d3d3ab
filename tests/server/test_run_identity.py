"""Every federation run has an identity: a fresh run starts fresh (the old run is moved
aside, never appended to), a resume continues the same run, a resume of another
configuration is refused, and a run in which no round updated the model fails.
Real ServerApp code and real ClientApp handlers, in this process (server.inprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clients.app import app as client_app
from clients.task import RUN_DEFAULTS
from fedmoco.checkpoint import load_checkpoint
from fedmoco.errors import ConfigError
from server.app import run_federation
from server.inprocess import InProcessGrid, make_context
from server.runs import FederationFailed, config_hash, identity_config, validate_run_config
from server.strategy import load_server_state

RUN = {**RUN_DEFAULTS, "arch": "tiny", "dim": 8, "hidden-dim": 16, "image-size": 16, "local-queue-size": 32,
       "batch-size": 8, "max-steps-per-epoch": 1, "domain": "images", "key-sample-rate": 0.5, "max-keys": 16,
       "input-mean": "0.5", "input-std": "0.25",  # fixed units: an images site shares only with them
       "queue-sample": 16, "global-queue-size": 64, "plots": False, "min-nodes": 2, "num-server-rounds": 1}


@pytest.fixture(scope="module")
def sites_root(tmp_path_factory) -> Path:
    from domains.images import make_demo_images

    root = tmp_path_factory.mktemp("sites")
    for i in range(2):
        make_demo_images(root / f"site-{i}", n_per_class=3, size=16, seed=i, rgb=False)
    return root


def federate(out: Path, sites_root: Path, node_config=None, **over):
    run = {**RUN, "demo-root": str(sites_root), "out-dir": str(out), **over}
    sites = {n: (client_app, make_context(n, {"partition-id": n - 100, **(node_config or {})}, run))
             for n in (100, 101)}
    return run_federation(InProcessGrid(sites), run)


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]


def test_fresh_run_has_an_identity_everywhere(tmp_path, sites_root):
    result = federate(tmp_path / "srv", sites_root, **{"num-server-rounds": 2})
    state = load_server_state(result.state)
    ident = state["run-identity"]
    assert ident["config-hash"] == config_hash(identity_config({**RUN, "num-server-rounds": 2}))
    assert [(r["round"], r["run-id"]) for r in lines(result.out_dir)] == [(1, ident["run-id"]), (2, ident["run-id"])]
    fed = load_checkpoint(result.encoder)["federation"]
    assert (fed["run-id"], fed["config-hash"]) == (ident["run-id"], ident["config-hash"])


def test_fresh_run_into_a_used_out_dir_moves_the_old_run_aside(tmp_path, sites_root):
    out = tmp_path / "srv"
    first = federate(out, sites_root)
    old_id = load_server_state(first.state)["run-identity"]["run-id"]
    old_lines = (out / "rounds.jsonl").read_text()
    second = federate(out, sites_root, resume=False)
    new_id = load_server_state(second.state)["run-identity"]["run-id"]
    assert new_id != old_id
    assert [r["run-id"] for r in lines(out)] == [new_id]  # not appended to the old file
    (backup,) = (out / "previous-runs").iterdir()
    assert backup.name.endswith(f"-{old_id}")
    assert (backup / "rounds.jsonl").read_text() == old_lines
    assert {p.name for p in backup.iterdir()} == {"rounds.jsonl", "server-state.pt", "encoder.pt"}


def test_resume_continues_the_same_run(tmp_path, sites_root):
    out = tmp_path / "srv"
    first = federate(out, sites_root)
    run_id = load_server_state(first.state)["run-identity"]["run-id"]
    second = federate(out, sites_root, **{"num-server-rounds": 2, "resume": True})
    assert second.resumed_from == 1 and second.rounds_done == 2
    assert [(r["round"], r["run-id"]) for r in lines(out)] == [(1, run_id), (2, run_id)]
    assert not (out / "previous-runs").exists()


def test_resume_of_another_configuration_is_refused(tmp_path, sites_root):
    out = tmp_path / "srv"
    first = federate(out, sites_root)
    run_id = load_server_state(first.state)["run-identity"]["run-id"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigError) as err:
        federate(out, sites_root, **{"num-server-rounds": 2, "resume": True, "global-queue-size": 128})
    assert str(err.value) == (f"{out}: resume=true, but run {run_id} there has another configuration "
                              "(global-queue-size 64 (saved) vs 128 (now)); use another out-dir, or resume=false "
                              f"to start a new run there (the old one is moved to {out / 'previous-runs'})")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched


def test_model_dp_accounts_every_release_at_its_own_noise_across_a_resume(tmp_path, sites_root):
    """A resume may change model-dp-noise; the epsilon composes each release at the noise it
    had (it was re-accounted at the new noise: 7.08 reported as 0.32). Turning model DP off
    or on midway is refused: noise-free releases leave no finite epsilon."""
    out = tmp_path / "srv"
    federate(out, sites_root, **{"model-dp-noise": 1.0})
    federate(out, sites_root, **{"num-server-rounds": 2, "resume": True, "model-dp-noise": 20.0})
    assert [r["model-dp-epsilon"] for r in lines(out)] == [pytest.approx(_epsilon([(1.0, 1)])),
                                                            pytest.approx(_epsilon([(1.0, 1), (20.0, 1)]))]
    assert _epsilon([(1.0, 1), (20.0, 1)]) > 3 * _epsilon([(20.0, 2)])  # what the re-accounting reported
    assert load_server_state(out / "server-state.pt")["ledger"]["model-dp"]["history"] == [[1.0, 1], [20.0, 1]]
    with pytest.raises(ConfigError) as err:
        federate(out, sites_root, **{"num-server-rounds": 3, "resume": True, "model-dp-noise": 0.0})
    assert str(err.value) == (f"{out}: resume=true, but model DP was on for rounds 1-2 and would be off now "
                              "(model-dp-noise 0); model DP covers all of a run's rounds or none: keep it as it was, "
                              "or resume=false to start a new run there")


def _epsilon(history, delta=1e-5):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(z, 1.0, n) for z, n in history]
    return acc.get_epsilon(delta)


def test_a_resumed_run_whose_new_rounds_all_fail_still_writes_its_encoder(tmp_path, sites_root):
    """Round 1 updated the model; after a resume round 2 fails at every site. The run is not
    one "in which no round updated the model": its encoder (round 1's model) is written."""
    out = tmp_path / "srv"
    federate(out, sites_root)
    result = federate(out, sites_root, {"data-path": str(tmp_path / "nowhere")},
                      **{"num-server-rounds": 2, "resume": True})
    assert [r["updated"] for r in lines(out)] == [True, False]
    assert result.encoder.is_file() and load_checkpoint(result.encoder)["federation"]["rounds"] == 2


def test_simulation_refuses_a_resume_before_it_makes_anything(tmp_path, sites_root, capsys):
    """A resume the ServerApp would refuse (another configuration) is refused first, in one line,
    before the sites' data is generated again and Flower is started."""
    from server.simulation import main as simulate

    out = tmp_path / "sim"
    federate(out / "server", sites_root)
    capsys.readouterr()  # the first run's log (shown when an earlier test configured logging)
    assert simulate(["--out", str(out), "--sites", "2", "--rounds", "2", "--run-config", "resume=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m server.simulation: error: {out / 'server'}: resume=true, "
                                               "but run ")
    assert not (out / "data").exists()
    assert simulate(["--out", str(out), "--sites", "2", "--run-config", "min-nodes=3"]) == 2
    assert capsys.readouterr().err.strip() == ("python -m server.simulation: error: run_config min-nodes 3 is more "
                                               "than the 2 simulated site(s) (--sites)")


def test_no_round_updating_the_model_fails_the_run(tmp_path, sites_root):
    out = tmp_path / "srv"
    with pytest.raises(FederationFailed) as err:
        federate(out, sites_root, {"data-path": str(tmp_path / "nowhere")}, **{"num-server-rounds": 2})
    msg = str(err.value)
    assert msg.startswith("no round updated the global model (2 round(s); last round: node 10")
    assert "node 100: error (site data unavailable" in msg and "node 101: error (site data unavailable" in msg
    assert msg.endswith(f"no encoder was written; see {out / 'rounds.jsonl'}")
    assert not (out / "encoder.pt").exists()
    assert [r["updated"] for r in lines(out)] == [False, False]
    # resumed with every round done, it wrote the round-0 model as the run's encoder, exit 0
    with pytest.raises(FederationFailed) as err:
        federate(out, sites_root, **{"num-server-rounds": 2, "resume": True})
    assert str(err.value) == ("all 2 rounds were already done and no round updated the global model; no encoder "
                              f"was written; see {out / 'rounds.jsonl'}")
    assert not (out / "encoder.pt").exists()


@pytest.mark.parametrize("over,message", [
    ({"aggregation": "foo"}, "aggregation: unknown 'foo'; choose fedavg, fedmedian, fedtrimmedavg or krum"),
    ({"image-size": 3}, "run_config image-size must be in [8, 4096], got 3"),
    ({"image-size": 100000}, "run_config image-size must be in [8, 4096], got 100000"),
    # a value that is no value of the key's type, or would pass as another
    ({"max-keys": float("inf")}, "run_config max-keys: expected int, got inf"),
    ({"num-server-rounds": float("inf")}, "run_config num-server-rounds: expected int, got inf"),
    ({"lr": True}, "run_config lr: expected float, got True"),
    ({"num-server-rounds": True}, "run_config num-server-rounds: expected int, got True"),
    ({"resume": 2}, "run_config resume: expected bool, got 2"),
    ({"lr": float("nan")}, "run_config lr: expected float, got nan"),
    ({"lr": float("inf")}, "run_config lr must be > 0 and finite, got inf"),
    # choices and ranges a site would otherwise refuse every round, or the server at its start
    ({"key-release": "bogus"}, "run_config key-release must be one of prototypes, keys, none, got 'bogus'"),
    ({"domain": "foo"}, "run_config domain must be one of images, medical, satellite, got 'foo'"),
    ({"prototype-sample-rate": 0.0}, "run_config prototype-sample-rate must be in (0, 1], got 0.0"),
    ({"prototype-centres": -3}, "run_config prototype-centres must be >= 1, got -3"),
    ({"prototype-min-cosine": 7.0}, "run_config prototype-min-cosine must be in [0, 1], got 7.0"),
    ({"max-update-norm": -5.0}, "run_config max-update-norm must be >= 0 (0 = off), got -5.0"),
    ({"model-dp-clip": 0.0}, "run_config model-dp-clip must be > 0 and finite, got 0.0"),
    ({"max-keys": 10**12}, "run_config max-keys must be in [0, 65536], got 1000000000000"),
    ({"site-example-caps": "garbage"}, "site-example-caps: 'garbage' is not name=N with N an integer"),
    ({"max-examples-per-site": 0}, "max-examples-per-site: expected an integer >= 1, got 0"),
    # the config dataclasses' checks, named by the run_config key
    ({"local-queue-size": 0}, "run_config local-queue-size must be >= 1, got 0"),
    ({"local-epochs": 0}, "run_config local-epochs must be >= 1, got 0"),
    ({"batch-size": 1}, "run_config batch-size must be >= 2, got 1"),
    ({"temperature": 0.0}, "run_config temperature must be > 0, got 0.0"),
    ({"num-server-rounds": 0}, "run_config num-server-rounds must be in [1, 100000], got 0"),
    ({"prototype-first-share": 0.5}, "run_config prototype-first-share must be in [1, 100] (1 = every release "
                                     "alike), got 0.5"),
    ({"prototype-first-share": 1e14}, "run_config prototype-first-share must be in [1, 100] (1 = every release "
                                      "alike), got 100000000000000.0"),
    ({"dimm": 3}, "run_config dimm: unknown key; did you mean dim?"),
    # refused before a fresh run moves an earlier one aside, not by the strategy after it
    ({"model-dp-noise": 1.0, "aggregation": "fedmedian"},
     "model DP (model-dp-noise > 0) is analysed for FedAvg only; use aggregation=fedavg"),
    # values every site would fail on every round, or the server could not allocate
    ({"input-std": "0"}, "run_config input-std: '0' holds a standard deviation that is not > 0"),
    ({"input-std": "0.2,-1,0.2"}, "run_config input-std: '0.2,-1,0.2' holds a standard deviation that is not > 0"),
    ({"input-mean": "nan"}, "run_config input-mean: 'nan' holds a value that is not finite"),
    ({"input-std": "inf"}, "run_config input-std: 'inf' holds a value that is not finite"),
    ({"temperature": float("inf")}, "run_config temperature must be > 0 and finite, got inf"),
    ({"weight-decay": float("inf")}, "run_config weight-decay must be >= 0 and finite, got inf"),
    ({"model-dp-noise": float("inf")}, "run_config model-dp-noise must be >= 0 and finite, got inf"),
    ({"global-queue-size": 10**11}, "run_config global-queue-size must be in [1, 1048576], got 100000000000"),
    ({"dim": 10**9}, "run_config dim must be in [1, 8192], got 1000000000"),
    ({"seed": 2**64}, "run_config seed: 18446744073709551616 does not fit a 64-bit integer"),
    ({"seed": 2**40}, "run_config seed must be in [0, 2**32), got 1099511627776"),
    ({"max-examples-per-site": 2**70}, f"run_config max-examples-per-site: {2**70} does not fit a 64-bit integer"),
    ({"release-ema": 1.0}, "run_config release-ema must be in [0, 1), got 1.0"),
    ({"lr": "abc"}, "run_config lr: expected float, got 'abc'"),
    ({"warmup-epochs": 5.0}, "run_config warmup-epochs 5 is longer than the federation's 1 local epochs "
                             "(num-server-rounds x local-epochs)"),
])
def test_run_config_errors_name_the_key(over, message):
    with pytest.raises(ConfigError) as err:
        validate_run_config({**RUN, **over})
    assert str(err.value) == message


@pytest.mark.parametrize("args,message", [
    (["--run-config", "bogus"], "--run-config: expected key=value pairs separated by spaces, got 'bogus'"),
    (["--image-size", "3"], "--image-size must be >= 32 for the generated medical archives, got 3"),
    (["--run-config", 'aggregation="foo"'],
     "aggregation: unknown 'foo'; choose fedavg, fedmedian, fedtrimmedavg or krum"),
    (["--sites", "0"], "--sites must be >= 1, got 0"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
])
def test_simulation_bad_input_is_one_line_before_anything_starts(tmp_path, capsys, args, message):
    from server.simulation import main as simulation

    assert simulation(["--out", str(tmp_path / "sim"), *args]) == 2
    assert capsys.readouterr().err == f"python -m server.simulation: error: {message}\n"
    assert not (tmp_path / "sim").exists()  # no data generated, no SuperLink started


def test_simulation_and_demo_name_an_output_folder_they_cannot_make(tmp_path, capsys):
    from examples.demo import main as demo
    from server.simulation import main as simulation

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert simulation(["--out", str(blocker / "sim"), "--sites", "1", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m server.simulation: error: {blocker / 'sim'}: Not a directory\n"
    assert demo(["--out", str(blocker / "demo"), "--quick"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"python -m examples.demo: error: {blocker / 'demo'}") and last.endswith(": Not a directory")


def test_simulation_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server.simulation", "--out", str(tmp_path / "sim"),
                           "--run-config", "bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "python -m server.simulation: error: --run-config: expected key=value pairs separated by spaces, got 'bogus'"]


def test_simulation_names_a_run_without_updates_in_one_line(tmp_path):
    """What ``python -m server.simulation`` prints (exit 1) when the ServerApp failed that way."""
    from server.simulation import no_update_line

    metrics = tmp_path / "rounds.jsonl"
    old = {"event": "round", "round": 1, "run-id": "old", "updated": True, "time": 10.0, "sites": []}
    failed = [{"event": "round", "round": r, "run-id": "new", "updated": False, "time": 20.0 + r,
               "sites": [{"node": 5, "site": "north", "status": "error", "reason": "site data unavailable"}]}
              for r in (1, 2)]
    metrics.write_text("".join(json.dumps(x) + "\n" for x in [old, *failed]))
    assert no_update_line(metrics, since=15.0) == (
        "no round updated the global model (2 round(s); last round: north: error (site data unavailable)); "
        f"no encoder was written; see {metrics}")
    assert no_update_line(metrics, since=30.0) is None  # nothing this run logged: another failure
    resumed = [{**failed[0], "updated": True, "time": 5.0}, failed[1]]  # round 1 updated, before the resume
    metrics.write_text("".join(json.dumps(x) + "\n" for x in resumed))
    assert no_update_line(metrics, since=15.0) is None
    metrics.write_text(json.dumps({**failed[0], "updated": True}) + "\n")
    assert no_update_line(metrics) is None


def test_same_seed_same_federation_another_seed_another(tmp_path, sites_root):
    """The round-0 model follows the run's seed (server.app.initial_model), as the sites' draws
    do: one configuration run twice gives the same encoder; another seed, another one."""
    import torch

    def encoder(out: Path, **over) -> dict:
        return load_checkpoint(federate(out, sites_root, **over).encoder)["model"]

    first, again = encoder(tmp_path / "a"), encoder(tmp_path / "b")
    other = encoder(tmp_path / "c", seed=1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_a_round_that_changed_nothing_is_counted_done_and_said_so(tmp_path, sites_root, caplog):
    # 2 rounds; a resume to 3 whose round 3 fails at every site; a resume again finds 3 done
    import logging

    out = tmp_path / "srv"
    federate(out, sites_root, **{"num-server-rounds": 2, "resume": False})
    with caplog.at_level(logging.WARNING, logger="flwr.fedmoco.server"):  # not a failed run: rounds 1-2 updated
        federate(out, sites_root, {"data-path": str(tmp_path / "nowhere")}, **{"num-server-rounds": 3, "resume": True})
    assert "no round since the resume (3-3) updated the global model; the encoder is round 2's model" in caplog.text
    assert load_server_state(out / "server-state.pt")["updated-rounds"] == [1, 2]
    with caplog.at_level(logging.INFO, logger="flwr.fedmoco.server"):
        result = federate(out, sites_root, **{"num-server-rounds": 3, "resume": True})
    assert "all 3 rounds were already done (2 of them updated the model)" in caplog.text
    fed = load_checkpoint(result.encoder)["federation"]
    assert (fed["rounds"], fed["updated-rounds"]) == (3, 2)


def test_a_resume_drops_lines_of_rounds_the_checkpoint_does_not_hold(tmp_path):
    import json

    from fedmoco.metrics import read_jsonl
    from server.runs import drop_rounds_after

    metrics = tmp_path / "rounds.jsonl"
    lines = [{"event": "round", "round": r, "run-id": "abc"} for r in (1, 2, 3)] + [{"event": "note"}]
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    # stopped after logging round 3, before checkpointing it: the checkpoint holds round 2
    assert drop_rounds_after(metrics, 2) == 1
    assert [x.get("round") for x in read_jsonl(metrics)] == [1, 2, None]
    assert drop_rounds_after(metrics, 2) == 0 and drop_rounds_after(tmp_path / "missing.jsonl", 0) == 0
