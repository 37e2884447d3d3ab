"""Sites have names (node_config ``site-name``): the server's logs, rounds.jsonl and plots use
them instead of node ids, they stay the same across runs, and a name can never be a path.
The site's own log lists its unreadable files by reason every round."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from clients.app import app as client_app
from clients.task import RUN_DEFAULTS, check_site_name, site_name
from fedmoco.errors import ConfigError
from fedmoco.federation_plots import _site_key, _site_label
from server.app import run_federation
from server.inprocess import InProcessGrid, make_context
from server.validation import ReplyLimits, site_name_of, validate_reply
from server_test_helpers import good_metrics, reply_content, tiny_arrays, unit_keys

RUN = {**RUN_DEFAULTS, "arch": "tiny", "dim": 8, "hidden-dim": 16, "image-size": 32, "local-queue-size": 32,
       "batch-size": 8, "max-steps-per-epoch": 1, "domain": "medical", "in-channels": 1, "key-sample-rate": 0.5, "max-keys": 16,
       "queue-sample": 16, "global-queue-size": 64, "plots": True, "min-nodes": 2, "num-server-rounds": 2}


@pytest.fixture(scope="module")
def sites_root(tmp_path_factory) -> Path:
    from domains.medical.demo import make_demo_archive

    root = tmp_path_factory.mktemp("sites")
    for i in range(2):  # each archive holds stray and broken files next to its images
        make_demo_archive(root / f"site-{i}", n_patients=2, seed=i, image_size=32, n_slices=2)
    return root


def federate(out: Path, sites_root: Path, names: dict[int, str | None], missing: int | None = None, **over):
    """Sites ``names`` (node -> site-name) on the generated archives; node ``missing`` gets a
    data-path that does not exist."""
    run = {**RUN, "demo-root": str(sites_root), "out-dir": str(out), "resume": False, **over}
    paths = {n: sites_root / (f"site-{i}" if n != missing else "gone") for i, n in enumerate(names)}
    sites = {n: (client_app, make_context(n, {"data-path": str(paths[n]), **({"site-name": name} if name else {})},
                                          run)) for n, name in names.items()}
    return run_federation(InProcessGrid(sites), run)


def site_entries(out: Path) -> list[list[tuple[int, str | None, str]]]:
    return [[(s["node"], s.get("site"), s["status"]) for s in json.loads(line)["sites"]]
            for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_names_in_logs_rounds_and_plots_and_stable_across_runs(tmp_path, sites_root, caplog):
    with caplog.at_level(logging.INFO):
        federate(tmp_path / "a", sites_root, {100: "hospital-a", 101: "clinic.b_2"})
    assert [sorted(r) for r in site_entries(tmp_path / "a")] == [
        [(100, "hospital-a", "accepted"), (101, "clinic.b_2", "accepted")]] * 2
    # a later run: new node ids (a SuperNode that re-registered), same names
    federate(tmp_path / "b", sites_root, {7001: "hospital-a", 7002: "clinic.b_2"})
    assert {s for r in site_entries(tmp_path / "b") for _, s, _ in r} == {"hospital-a", "clinic.b_2"}
    # the site's own log: its skipped file and the reason, every round
    skips = [r.getMessage() for r in caplog.records if r.name == "flwr.fedmoco.client" and "skipped" in r.getMessage()]
    assert sorted(m.split(":")[0] for m in skips) == ["round 1"] * 4 + ["round 2"] * 4  # 2 runs x 2 sites
    assert all(m.split(": ", 1)[1].startswith("skipped ") and "not DICOM" in m for m in skips), skips
    # plots label a named site by its name, an unnamed one by its node
    assert _site_label(_site_key({"node": 7001, "site": "hospital-a"}), {}) == "hospital-a"
    assert _site_label(_site_key({"node": 123456789}), {123456789: 0}) == "site 0 (node …6789)"
    assert (tmp_path / "b" / "plots" / "loss.png").exists()


def test_an_invalid_name_is_a_site_misconfiguration(tmp_path, sites_root, caplog):
    with caplog.at_level(logging.WARNING, logger="flwr.fedmoco.server"):
        federate(tmp_path / "srv", sites_root, {100: "hospital-a", 101: "../../etc"})
    first = dict((n, (s, st)) for n, s, st in site_entries(tmp_path / "srv")[0])
    assert first == {100: ("hospital-a", "accepted"), 101: (None, "error")}
    assert "round 1: node 101 sent no update (code 101): configuration: node_config site-name: '<path>' is not a site name" \
        in caplog.text


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", "x" * 33, "hôpital", "a b", "C:\\data"])
def test_names_that_could_be_paths_or_garbage_are_refused(name):
    with pytest.raises(ConfigError, match="is not a site name: 1 to 32 characters of A-Z a-z 0-9 . _ -"):
        check_site_name(name)


def test_default_name_in_simulation_and_none_in_deployment():
    assert site_name({"partition-id": 3}) == "site-3"
    assert site_name({"site-name": " north-7 ", "partition-id": 3}) == "north-7"
    assert site_name({}) is None


@pytest.mark.parametrize("record,reason", [
    (ConfigRecord({"name": "a/b"}), "site name: 'a/b' is not a site name"),
    (ConfigRecord({"name": "ok", "path": "/data"}), "site: expected exactly one entry 'name', got ['name', 'path']"),
])
def test_server_rejects_a_bad_site_record(record, reason):
    arrays = tiny_arrays()
    reference = {k: a.numpy() for k, a in arrays.items()}
    content = reply_content(arrays, unit_keys(2), good_metrics())
    limits = ReplyLimits(key_dim=8, max_keys=16)
    content["site"] = ConfigRecord({"name": "hospital-a"})
    assert validate_reply(content, reference, limits) == [] and site_name_of(content) == "hospital-a"
    content["site"] = record
    reasons = validate_reply(content, reference, limits)
    assert len(reasons) == 1 and reasons[0].startswith(reason)
    assert site_name_of(content) is None


def test_a_restarted_server_still_names_a_site_whose_reply_is_an_error(tmp_path, sites_root):
    out = tmp_path / "srv"
    federate(out, sites_root, {100: "hospital-a", 101: "clinic-b"}, **{"num-server-rounds": 1})
    # the server restarts and resumes; clinic-b's data folder has gone: its replies are errors
    federate(out, sites_root, {100: "hospital-a", 101: "clinic-b"}, missing=101,
             **{"num-server-rounds": 2, "resume": True})
    assert sorted(site_entries(out)[1]) == [(100, "hospital-a", "accepted"), (101, "clinic-b", "error")]
