"""Simulated sites own a budget: ``make_demo_sites`` plays each site's admin (fedmoco-site.toml).

Flower's simulation gives a site no node_config but ``partition-id``/``num-partitions``, so
the budget and ledger of ``python -m server.simulation`` come from the settings file the
generator writes in each site's data folder. Here the real ServerApp code and ClientApp run
over ``server.inprocess.InProcessGrid`` with exactly that node_config, on generated sites.
"""

from __future__ import annotations

import json
import logging
import re
import tomllib
from pathlib import Path

import pytest

from clients.app import app as client_app
from clients.ledger import LEDGER_FILE, read_ledger
from clients.task import RUN_DEFAULTS
from fedmoco.data import SITE_SETTINGS_FILE
from fedmoco.cli import main as cli
from server.app import run_federation
from server.inprocess import InProcessGrid, make_context
from server.simulation import DEMO_BUDGET, make_demo_sites, queue_summary, write_site_settings

RUN = {**RUN_DEFAULTS, "arch": "tiny", "dim": 16, "hidden-dim": 32, "image-size": 32, "local-queue-size": 64,
       "batch-size": 8, "max-steps-per-epoch": 2, "domain": "images", "num-server-rounds": 2, "min-nodes": 2,
       "input-mean": "0.5", "input-std": "0.25",  # fixed units: an images site shares only with them
       "prototype-centres": 4, "key-release": "prototypes", "plots": False, "resume": False}


def simulate(tmp_path: Path, **sites_kwargs) -> list[dict]:
    """Two generated sites, a two-round federation as Flower's simulation runs it; rounds.jsonl."""
    make_demo_sites("images", tmp_path / "data", 2, image_size=32, **sites_kwargs)
    run = {**RUN, "demo-root": str(tmp_path / "data"), "out-dir": str(tmp_path / "server")}
    # what Flower's simulation puts in a simulated node's node_config, and nothing else
    sites = {100 + i: (client_app, make_context(100 + i, {"partition-id": i, "num-partitions": 2}, run))
             for i in range(2)}
    run_federation(InProcessGrid(sites), run)
    return [json.loads(line) for line in (tmp_path / "server" / "rounds.jsonl").read_text().splitlines()]


def test_simulated_sites_share_prototypes_from_their_own_budget(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        rounds = simulate(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["dp-sharing"] == 2 and r["queue-added"] > 0
        assert {s["site"]: s["dp-status"] for s in r["sites"]} == {"site-0": 0.0, "site-1": 0.0}
        assert all(s["keys"] > 0 and s["dp-keys-budget"] == DEMO_BUDGET["dp-epsilon"] for s in r["sites"])
    assert 0 < rounds[0]["queue-size"] < rounds[1]["queue-size"] == rounds[0]["queue-added"] + rounds[1]["queue-added"]
    # the round's traffic in DP summaries: up from the sites, down as global negatives
    assert [r["keys-received"] for r in rounds] == [r["queue-added"] for r in rounds]
    assert [r["queue-sent"] for r in rounds] == [0, rounds[0]["queue-size"]]  # each got the other's
    # round 2: each site got the other's prototypes as negatives (its own are excluded)
    assert {s["site"]: s["queue-keys"] for s in rounds[1]["sites"]} == {
        "site-0": next(s["keys"] for s in rounds[0]["sites"] if s["site"] == "site-1"),
        "site-1": next(s["keys"] for s in rounds[0]["sites"] if s["site"] == "site-0")}
    assert "no budget" not in caplog.text and "sent no DP summaries" not in caplog.text
    # each ledger lies outside its data folder and holds this run's two releases
    for i in range(2):
        ledger_file = tmp_path / "site-state" / f"site-{i}" / LEDGER_FILE
        ledger = read_ledger(ledger_file)
        assert ledger.releases == 2 and ledger.epsilon_budget == DEMO_BUDGET["dp-epsilon"]
        assert 0 < ledger.spent() <= DEMO_BUDGET["dp-epsilon"]
        assert not ledger_file.resolve().is_relative_to((tmp_path / "data").resolve())
        assert sorted(p.name for p in (tmp_path / "data" / f"site-{i}").iterdir() if p.is_file()) == [SITE_SETTINGS_FILE]
    # the demo's closing line, from rounds.jsonl and the ledgers
    spent = [f"site-{i} {read_ledger(tmp_path / 'site-state' / f'site-{i}' / LEDGER_FILE).spent():.3g}/8"
             for i in range(2)]
    # round 2 trained against the other site's prototypes: they took a share of the softmax
    share = rounds[1]["global-share"]
    # per site it may be 0: false-negative cancellation can mask all of a site's few global
    # negatives when they share its queries' buckets, and the DP noise, drawn from a secure
    # generator, is not fixed by the run's seed
    assert 0 < share < 1 and rounds[0]["global-share"] == 0.0 and all(0 <= s["global-share"] < 1
                                                                     for s in rounds[1]["sites"])
    # and each site's log says so for round 2, not for round 1 (no global negatives yet)
    for r, site in ((2, s) for s in rounds[1]["sites"]):
        assert f"round {r}: " in caplog.text and f"global negatives {100 * site['global-share']:.1f}% of the softmax" \
            in caplog.text
    assert not any("round 1: " in m and "% of the softmax" in m for m in caplog.messages)
    assert queue_summary(tmp_path / "server" / "rounds.jsonl", tmp_path / "site-state") == (
        f"global queue: {rounds[1]['queue-size']} DP summaries from 2 site(s) after round 2 "
        f"({rounds[1]['queue-added']} added in it, 2 of 2 sites sharing); the global negatives took "
        f"{100 * share:.1f}% of the sites' InfoNCE softmax in that round; epsilon spent per site: "
        f"{', '.join(spent)} (delta 1e-05)")
    # the coordinator's `fedmoco plot` of the server's out-dir shows the queue
    assert cli(["plot", str(tmp_path / "server")]) == 0
    assert (tmp_path / "server" / "plots" / "queue.png").stat().st_size > 0


def test_without_a_site_budget_the_sites_share_weights_only(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="flwr.fedmoco.server"):
        rounds = simulate(tmp_path, budget=None)  # python -m server.simulation --no-site-budget
    assert not list((tmp_path / "data").glob(f"*/{SITE_SETTINGS_FILE}"))
    assert all(r["queue-size"] == 0 and r["dp-sharing"] == 0 for r in rounds)
    assert {s["dp-status"] for r in rounds for s in r["sites"]} == {4.0}
    assert "no budget" in caplog.text
    assert queue_summary(tmp_path / "server" / "rounds.jsonl", tmp_path / "site-state") == (
        "global queue: 0 DP summaries from 0 site(s) after round 2 (0 added in it, 0 of 2 sites sharing); "
        "not sharing: sharing refused: no budget (set dp-epsilon, in node_config or fedmoco-site.toml)")


def test_settings_file_written_as_a_site_admin_would(tmp_path):
    sites = make_demo_sites("images", tmp_path / "data", 2, image_size=16, state_root=tmp_path / "state")
    for i, site in enumerate(sites):
        settings = tomllib.loads((site / SITE_SETTINGS_FILE).read_text())
        ledger = tmp_path.resolve() / "state" / f"site-{i}" / LEDGER_FILE
        assert settings == {**DEMO_BUDGET, "ledger-path": str(ledger)}
    # regenerated data is a new site: the old ledger goes with the old data
    (tmp_path / "state" / "site-0" / LEDGER_FILE).write_text("{}")
    write_site_settings(sites, tmp_path / "state")
    assert not (tmp_path / "state" / "site-0" / LEDGER_FILE).exists()
    with pytest.raises(ValueError, match="not site settings: key-release"):
        write_site_settings(sites, tmp_path / "state", {"dp-epsilon": 1.0, "key-release": "keys"})


def test_run_config_may_be_given_several_times_and_one_out_dir_takes_one_run(tmp_path, capsys):
    import argparse
    import fcntl

    from server.simulation import main, simulation_run_config

    args = argparse.Namespace(domain="medical", sites=2, rounds=3, out=tmp_path, image_size=32, timeout=600.0,
                              run_config=['key-release="prototypes" local-epochs=4', "resume=true"])
    cfg = simulation_run_config(args)  # the resume hint's "same command and --run-config 'resume=true'"
    assert cfg["key-release"] == "prototypes" and cfg["local-epochs"] == 4 and cfg["resume"] is True
    # Flower runs the ServerApp in a temporary folder: a relative out-dir wrote every output there,
    # deleted at exit (found by an audit). Both folders are made absolute from the caller's cwd.
    args.run_config = ['out-dir="rel-server" demo-root="~/sites"']
    cfg = simulation_run_config(args)
    assert cfg["out-dir"] == str(Path.cwd() / "rel-server") and cfg["demo-root"] == str(Path.home() / "sites")
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".simulation.lock", "a+") as held:  # a simulation already running into it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["--sites", "2", "--rounds", "1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"python -m server.simulation: error: another simulation is running into "
                                       f"{tmp_path.resolve()}; wait for it, or give another --out\n")
    assert not (tmp_path / "data").exists()  # nothing was generated under the running one


def test_the_console_gets_the_federations_own_lines_once_and_without_colour_codes():
    from server.simulation import _ANSI, _worth_echoing

    moved = b"\x1b[93mWARNING \x1b[0m: /x/server held an earlier run: its outputs were moved to /x/server/previous\n"
    assert _worth_echoing(moved) and _ANSI.sub("", moved.decode()) == (
        "WARNING : /x/server held an earlier run: its outputs were moved to /x/server/previous\n")
    assert _worth_echoing(b"INFO : round 2: sent the global model\n")
    assert not _worth_echoing(b"INFO : aggregated encoder: /x/encoder.pt\n")  # the summary prints it once
    assert not _worth_echoing(b"11/29/2026 10:00:00:INFO: round 2: sent the global model\n")  # Flower's copy


@pytest.mark.parametrize("given, kept", [("resume=true", True), ('resume="false"', False), ("resume=0", False),
                                         ('resume="true"', True)])
def test_a_resumed_simulation_keeps_the_ledgers_exactly_when_the_server_resumes(tmp_path, monkeypatch, given, kept):
    # The server reads resume through run_value ("false" as a TOML string is no); the simulation
    # must read it the same way, or a fresh server run would meet ledgers of spent budget.
    import server.simulation as sim

    seen = {}

    def fake_sites(domain, root, n, *, image_size, budget, state_root, keep_ledgers):
        seen["keep_ledgers"] = keep_ledgers
        return []

    def stop(*a, **k):
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(sim, "make_demo_sites", fake_sites)
    monkeypatch.setattr(sim, "run_simulation", stop)
    assert sim.main(["--sites", "2", "--rounds", "1", "--out", str(tmp_path), "--run-config", given]) == 1
    assert seen == {"keep_ledgers": kept}


def test_run_config_overrides_take_quoted_values_with_spaces_and_refuse_an_open_quote():
    """A quoted path with a space was refused ("got 'dir/server\\"'"), and an unclosed quote
    became part of a folder's name (found by an audit)."""
    from fedmoco.errors import ConfigError
    from server.simulation import parse_overrides

    assert parse_overrides('local-epochs=2 out-dir="/tmp/my dir/server" data-options="bands=B02,B03" seed=3',
                           "momentum=0.9 name='a b'") == {
        "local-epochs": 2, "out-dir": "/tmp/my dir/server", "data-options": "bands=B02,B03", "seed": 3,
        "momentum": 0.9, "name": "a b"}
    assert parse_overrides("domain=medical", "domain=satellite") == {"domain": "satellite"}  # later wins
    for bad, message in [('out-dir="unterminated', "out-dir: the quote in '\"unterminated' does not close"),
                         ("justaword", "expected key=value pairs separated by spaces, got 'justaword'"),
                         ('a="x"b', "got 'a=\"x\"b'")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_overrides(bad)
