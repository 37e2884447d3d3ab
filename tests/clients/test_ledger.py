"""The site owns its privacy budget: node_config only, a persistent file-locked ledger, tighten-only.

Runs the real ClientApp handler (and, for whole runs, the real ServerApp code over
``server.inprocess.InProcessGrid``). A fresh ``Context`` is what a SuperNode restart or a new
``flwr run`` gives a site: ``Context.state`` is empty, only the site's disk remembers.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest
import torch
from client_test_helpers import context, dp_node, global_model, make_images_site, run_config, train_message

import clients.app as client_module
from clients.app import SITE_MISCONFIGURED, train
from clients.ledger import LEDGER_FILE, LOCK_NOTE, ledger_path, locked_ledger, read_ledger
from clients.task import shared_arrays
from fedmoco.errors import ConfigError
from fedmoco.ledger import DP_STATUS, SiteLedger, check_site_delta
from fedmoco.privacy import calibrate_prototype_noise, key_epsilon, prototype_epsilon


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_images_site(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def sent():
    return shared_arrays(global_model(run_config()))


def metrics(reply) -> dict[str, float]:
    assert not reply.has_error(), reply.error
    return dict(reply.content["metrics"])


def n_sent(reply) -> int:
    return reply.content["keys"]["keys"].shape[0]


# -- the budget comes from node_config only -----------------------------------------------------
def test_run_config_cannot_set_epsilon(site, sent, tmp_path, caplog):
    run = run_config(**{"dp-epsilon": 100.0, "dp-delta": 0.5})  # what a server might try
    node = {"data-path": str(site), "ledger-path": str(tmp_path / "l.json")}  # the site set no budget
    with caplog.at_level(logging.WARNING):
        m = metrics(reply := train(train_message(sent, 1), context(node, run)))
    assert n_sent(reply) == 0 and m["dp-status"] == 4 and m["dp-keys-epsilon"] == 0.0
    assert "run_config dp-epsilon, dp-delta ignored" in caplog.text and DP_STATUS[4] in caplog.text
    # with the site's own budget, the run_config values change nothing
    node["dp-epsilon"] = 1.0
    m = metrics(train(train_message(sent, 1), context(node, run)))
    assert m["dp-status"] == 0 and m["dp-keys-budget"] == 1.0 and m["dp-keys-delta"] == 1e-5
    assert read_ledger(tmp_path / "l.json").epsilon_budget == 1.0


def test_sharing_refused_without_a_persistent_ledger(site, sent, caplog):
    node = {"data-path": str(site), "dp-epsilon": 8.0}  # budget, but nowhere to keep the ledger
    with caplog.at_level(logging.WARNING):
        reply = train(train_message(sent, 1), context(node, run_config()))
    m = metrics(reply)
    assert n_sent(reply) == 0 and m["dp-status"] == 3 and m["dp-keys-releases"] == 0
    assert "sharing refused: no persistent ledger (set ledger-path or state-dir, in node_config or fedmoco-site.toml)" in caplog.text
    moved = max(np.abs(a.numpy() - sent[k].numpy()).max() for k, a in reply.content["arrays"].items())
    assert moved > 0  # trained and sent weights all the same


def test_a_site_normalising_with_its_own_statistics_shares_nothing_and_spends_nothing(site, sent, tmp_path, caplog):
    """Without federation units an images site's views depend on all its images (status 9):
    nothing is sent, the ledger is not opened, training goes on."""
    run = run_config(**{"input-mean": "", "input-std": ""})
    node = {"data-path": str(site), "dp-epsilon": 8.0, "ledger-path": str(tmp_path / "l.json")}
    with caplog.at_level(logging.WARNING):
        reply = train(train_message(sent, 1), context(node, run))
    m = metrics(reply)
    assert n_sent(reply) == 0 and m["dp-status"] == 9 and m["dp-keys-releases"] == 0
    assert not (tmp_path / "l.json").exists()
    assert DP_STATUS[9] in caplog.text and "the federation must fix run_config input-mean and input-std" in caplog.text


@pytest.mark.parametrize("delta,message", [(0.5, "must be in (0, 0.001], got 0.5"), (0.01, "must be in (0, 0.001]"),
                                           (0, "must be > 0"), ("x", "expected a number")])
def test_insane_delta_is_a_clear_error_reply(site, sent, tmp_path, delta, message):
    node = dp_node(site, tmp_path / "l.json", **{"dp-delta": delta})
    reply = train(train_message(sent, 1), context(node, run_config()))
    assert reply.has_error() and reply.error.code == SITE_MISCONFIGURED
    assert "dp-delta" in reply.error.reason and message in reply.error.reason
    assert not (tmp_path / "l.json").exists()  # nothing spent


def test_delta_must_be_below_one_over_the_image_count():
    assert check_site_delta(1e-5, 90_000) == 1e-5
    with pytest.raises(ConfigError, match="dp-delta: 0.0001 is too large for 20000 images"):
        check_site_delta(1e-4, 20_000)


def test_ledger_path_defaults_to_state_dir():
    assert ledger_path({"state-dir": "/s"}).as_posix() == f"/s/{LEDGER_FILE}"
    assert ledger_path({"state-dir": "/s", "ledger-path": "/l/x.json"}).as_posix() == "/l/x.json"
    assert ledger_path({}) is None


# -- persistence: new runs, SuperNode restarts, two runs sharing the ledger ---------------------
def test_ledger_persists_across_a_supernode_restart_and_a_new_run(site, sent, tmp_path):
    run = run_config(**{"num-server-rounds": 3})
    node = dp_node(site, tmp_path / "ledger.json", **{"dp-epsilon": 4.0})
    ctx = context(node, run)
    eps = [metrics(train(train_message(sent, r), ctx))["dp-keys-epsilon"] for r in (1, 2)]
    restarted = context(node, run)  # SuperNode restart mid-run: Context.state is gone
    m3 = metrics(train(train_message(sent, 3), restarted))
    assert m3["dp-keys-releases"] == 3 and eps[0] < eps[1] < m3["dp-keys-epsilon"] <= 4.0
    z = calibrate_prototype_noise(4.0, 1e-5, 3, 1.0)  # planned for 3 rounds and kept
    assert m3["dp-keys-epsilon"] == pytest.approx(prototype_epsilon(z, 1.0, 3, 1e-5), rel=0.01)
    # a new `flwr run` (round 1 again, fresh Context): the budget is not handed back
    m = metrics(train(train_message(sent, 1), context(node, run)))
    assert m["dp-status"] == 5 and m["dp-keys-releases"] == 3 and m["dp-keys-exhausted"] == 1
    saved = json.loads((tmp_path / "ledger.json").read_text())
    assert saved["mechanism"] == "prototypes" and saved["adjacency"] == "add/remove one record"
    assert sum(h["releases"] for h in saved["history"]) == 3 and saved["epsilon_spent"] <= 4.0


def test_a_round_that_releases_nothing_still_reports_what_the_ledger_spent(site, sent, tmp_path):
    """After a release, a run with key-release=none (or a site without a budget now) reported
    dp-keys-epsilon 0: rounds.jsonl and privacy.png showed the site's spending fall to 0."""
    node = dp_node(site, tmp_path / "ledger.json", **{"dp-epsilon": 4.0})
    spent = metrics(train(train_message(sent, 1), context(node, run_config(**{"num-server-rounds": 2}))))
    assert spent["dp-status"] == 0 and spent["dp-keys-epsilon"] > 0
    quiet = metrics(train(train_message(sent, 1), context(node, run_config(**{"key-release": "none"}))))
    assert quiet["dp-status"] == 2
    assert {k: quiet[k] for k in ("dp-keys-epsilon", "dp-keys-delta", "dp-keys-releases", "dp-keys-budget")} == {
        k: spent[k] for k in ("dp-keys-epsilon", "dp-keys-delta", "dp-keys-releases", "dp-keys-budget")}
    assert quiet["dp-keys-exhausted"] == 0.0


def test_exhausted_budget_is_reported_and_training_goes_on(site, sent, tmp_path, caplog):
    run = run_config(**{"num-server-rounds": 2, "key-release": "keys", "key-sample-rate": 0.5})
    ctx = context(dp_node(site, tmp_path / "l.json", **{"dp-epsilon": 2.0, "dp-rounds": 1}), run)
    first = train(train_message(sent, 1), ctx)
    assert n_sent(first) > 0 and metrics(first)["dp-keys-exhausted"] == 1.0  # planned for one release
    with caplog.at_level(logging.WARNING):
        second = train(train_message(sent, 2), ctx)
    m = metrics(second)
    assert n_sent(second) == 0 and m["dp-status"] == 5 and m["dp-keys-exhausted"] == 1.0
    assert m["dp-keys-releases"] == 1.0 and 1.9 <= m["dp-keys-epsilon"] <= 2.0 and m["dp-keys-budget"] == 2.0
    assert "privacy budget exhausted: spent eps=" in caplog.text


def test_a_removed_ledger_is_refused_not_replaced_by_a_fresh_budget(site, sent, tmp_path, caplog):
    """A ledger is written before every release, so a lock file without its ledger means the
    ledger was removed: the site refuses to share (status 7) rather than forget what it spent,
    and says how to start a new budget on purpose (remove the lock too)."""
    path = tmp_path / "l.json"
    node = {"data-path": str(site), "dp-epsilon": 8.0, "ledger-path": str(path)}
    assert metrics(train(train_message(sent, 1), context(node, run_config())))["dp-status"] == 0
    path.unlink()  # an rsync --delete, a wiped folder: the lock file stays
    with caplog.at_level(logging.ERROR):
        reply = train(train_message(sent, 2), context(node, run_config()))
    m = metrics(reply)
    assert n_sent(reply) == 0 and m["dp-status"] == 7 and not path.exists()
    assert (f"{path}: the privacy ledger is missing but its lock file l.json.lock says one was written, so its "
            f"spending would be forgotten; restore it, or delete {path}.lock too") in caplog.text
    # nor may asking for no noise step around the marked lock (status 8, as with a ledger)
    assert metrics(train(train_message(sent, 2), context({**node, "dp-epsilon": "inf"}, run_config())))[
        "dp-status"] == 8
    (tmp_path / "l.json.lock").unlink()  # the site admin's decision: a new budget
    assert metrics(train(train_message(sent, 3), context(node, run_config())))["dp-status"] == 0
    assert read_ledger(path).releases == 1


def test_a_ledger_of_an_older_fedmoco_with_an_unmarked_lock_goes_on_and_gets_marked(site, sent, tmp_path):
    """Lock files written before the mark existed are empty: such a ledger keeps working, and
    its next write marks the lock, from when on its removal is refused."""
    path = tmp_path / "l.json"
    node = {"data-path": str(site), "dp-epsilon": 8.0, "ledger-path": str(path)}
    assert metrics(train(train_message(sent, 1), context(node, run_config())))["dp-status"] == 0
    (tmp_path / "l.json.lock").write_text("")  # as an older fedmoco left it
    assert metrics(train(train_message(sent, 2), context(node, run_config())))["dp-status"] == 0
    assert read_ledger(path).releases == 2 and (tmp_path / "l.json.lock").read_text() == LOCK_NOTE


def test_the_ledger_is_locked_from_read_to_write(tmp_path):
    path = tmp_path / "l.json"
    order: list[str] = []

    def spend(tag: str, hold: float) -> None:
        with locked_ledger(path) as box:
            ledger = box["ledger"] or SiteLedger("prototypes", 8.0, 1e-5, 10)
            order.append(f"{tag} read {ledger.releases}")
            time.sleep(hold)
            ledger.record(2.0, 1.0)
            box["ledger"] = ledger
            order.append(f"{tag} wrote")

    first = threading.Thread(target=spend, args=("a", 0.5))
    first.start()
    time.sleep(0.1)
    spend("b", 0.0)  # must wait for a: flock on separate open files conflicts even in one process
    first.join()
    assert order == ["a read 0", "a wrote", "b read 1", "b wrote"]
    assert read_ledger(path).releases == 2  # no lost update
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json", "l.json.lock"]  # no temp files left


def test_an_unreadable_ledger_refuses_sharing_and_is_not_reset(site, sent, tmp_path, caplog):
    path = tmp_path / "l.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        m = metrics(train(train_message(sent, 1), context(dp_node(site, path), run_config())))
    assert m["dp-status"] == 7 and f"{path}: privacy ledger unreadable" in caplog.text
    assert path.read_text() == "{not json"


def test_a_ledger_that_cannot_be_written_refuses_sharing_and_weights_still_go(site, sent, tmp_path, caplog):
    # the ledger's folder cannot be made (a file is in the way; root-proof, unlike chmod)
    (tmp_path / "not-a-folder").write_text("x")
    path = tmp_path / "not-a-folder" / "l.json"
    with caplog.at_level(logging.WARNING):
        reply = train(train_message(sent, 1), context(dp_node(site, path), run_config()))
    m = metrics(reply)  # a reply with weights, not an error
    assert m["dp-status"] == 7 and reply.content["keys"]["keys"].numpy().shape[0] == 0
    assert "privacy ledger:" in caplog.text and "not-a-folder" in caplog.text


def test_a_legacy_key_ledger_is_carried_over(tmp_path):
    torch.save({"format": "fedmoco-key-ledger/1", "epsilon_budget": 6.0, "delta": 1e-6, "noise_multiplier": 0.9,
                "sample_rate": 0.05, "releases": 7}, tmp_path / "key-ledger.pt")
    ledger = read_ledger(tmp_path / LEDGER_FILE)
    assert (ledger.mechanism, ledger.epsilon_budget, ledger.delta, ledger.history) == ("keys", 6.0, 1e-6,
                                                                                      [(0.9, 0.05, 7)])
    assert ledger.spent() == pytest.approx(key_epsilon(0.9, 0.05, 7, 1e-6))


def test_a_removed_ledger_is_refused_through_a_link_and_beside_a_legacy_one(site, sent, tmp_path):
    """The removal check follows a ledger-path that is a symbolic link (as the writer does), and a
    ledger carried over from an older key-ledger.pt counts as written: neither opens the way to a
    fresh budget, or to a release without noise (dp-epsilon=inf, status 8)."""
    real = tmp_path / "real" / "ledger.json"
    real.parent.mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(real)
    node = {"data-path": str(site), "dp-epsilon": 8.0, "ledger-path": str(link)}
    assert metrics(train(train_message(sent, 1), context(node, run_config())))["dp-status"] == 0
    real.unlink()  # the lock beside the target is marked
    assert metrics(train(train_message(sent, 2), context(node, run_config())))["dp-status"] == 7
    assert metrics(train(train_message(sent, 2), context({**node, "dp-epsilon": "inf"}, run_config())))[
        "dp-status"] == 8
    # an older fedmoco's ledger alone: releasing without noise past it is refused
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"format": "fedmoco-key-ledger/1", "epsilon_budget": 6.0, "delta": 1e-6, "noise_multiplier": 2.0,
                "sample_rate": 0.05, "releases": 1}, legacy / "key-ledger.pt")
    inf_node = {"data-path": str(site), "dp-epsilon": "inf", "ledger-path": str(legacy / LEDGER_FILE)}
    assert metrics(train(train_message(sent, 1), context(inf_node, run_config(**{"key-release": "keys"}))))[
        "dp-status"] == 8
    # carried over, written, then removed: the legacy file beside it does not bring back its old figure
    keys_node = {**inf_node, "dp-epsilon": 8.0}
    # (the carried-over ledger planned its one release, so it is exhausted; it is written all the same)
    assert metrics(train(train_message(sent, 1), context(keys_node, run_config(**{"key-release": "keys"}))))[
        "dp-status"] == 5 and (legacy / LEDGER_FILE).is_file()
    (legacy / LEDGER_FILE).unlink()
    assert metrics(train(train_message(sent, 2), context(keys_node, run_config(**{"key-release": "keys"}))))[
        "dp-status"] == 7


def test_a_ledger_of_the_other_mode_refuses_sharing(site, sent, tmp_path):
    node = dp_node(site, tmp_path / "l.json")
    metrics(train(train_message(sent, 1), context(node, run_config(**{"key-release": "keys"}))))
    m = metrics(train(train_message(sent, 2), context(node, run_config())))
    assert m["dp-status"] == 6 and m["dp-keys-releases"] == 1  # the keys spending is still reported


# -- tighten, never loosen -------------------------------------------------------------------
def test_a_tightened_budget_applies_and_a_looser_one_is_ignored(site, sent, tmp_path, caplog):
    run = run_config(**{"num-server-rounds": 10})
    path = tmp_path / "l.json"
    m1 = metrics(train(train_message(sent, 1), context(dp_node(site, path, **{"dp-epsilon": 8.0}), run)))
    assert m1["dp-keys-budget"] == 8.0
    with caplog.at_level(logging.WARNING):
        m2 = metrics(train(train_message(sent, 2), context(dp_node(site, path, **{"dp-epsilon": 4.0}), run)))
    assert m2["dp-keys-budget"] == 4.0 and m2["dp-status"] == 0 and m2["dp-keys-epsilon"] <= 4.0
    assert "budget tightened: epsilon 8 -> 4" in caplog.text
    # the noise was re-planned for the 9 rounds left in the tighter budget: more noise than before
    history = read_ledger(path).history
    assert len(history) == 2 and history[1][0] > history[0][0]
    m3 = metrics(train(train_message(sent, 3), context(dp_node(site, path, **{"dp-epsilon": 50.0}), run)))
    assert m3["dp-keys-budget"] == 4.0 and "dp-epsilon 50 ignored" in caplog.text
    # tightening below what is already spent closes the ledger
    m4 = metrics(train(train_message(sent, 4), context(dp_node(site, path, **{"dp-epsilon": 0.01}), run)))
    assert m4["dp-status"] == 5 and m4["dp-keys-budget"] == 0.01


def test_site_ledger_accounting_and_round_trip():
    ledger = SiteLedger("prototypes", 1.5, 1e-5, 10)
    z = ledger.next_noise(1.0)
    assert z == pytest.approx(calibrate_prototype_noise(1.5, 1e-5, 10, 1.0))
    for _ in range(10):
        ledger.record(z, 1.0)
    assert ledger.history == [(z, 1.0, 10)] and 1.45 <= ledger.spent() <= 1.5
    assert ledger.next_noise(1.0) is None  # the plan is done
    assert ledger.replan(11) and ledger.remaining == 1
    assert ledger.next_noise(1.0) > 10 * z  # what is left pays for one more only at far more noise
    again = SiteLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert again.history == ledger.history and again.spent() == ledger.spent()
    mixed = SiteLedger("prototypes", 3.0, 1e-5, 7, [(4.0, 0.5, 2)])
    z2 = mixed.next_noise(0.5)  # what is left after spending at z=4, for the 5 more planned releases
    mixed_after = SiteLedger("prototypes", 3.0, 1e-5, 7, [(4.0, 0.5, 2), (z2, 0.5, 5)])
    assert 2.9 <= mixed_after.spent() <= 3.0
    with pytest.raises(ConfigError, match="mechanism"):
        SiteLedger("gradients", 1.0, 1e-5, 1)
    with pytest.raises(ConfigError, match="format"):
        SiteLedger.from_state_dict({"format": "something else"})


@pytest.mark.parametrize("mechanism, q", [("prototypes", 1.0), ("keys", 0.05)])
def test_tiny_spends_price_without_opacus_optimal_order_warnings(mechanism, q):
    # At z = 1000 Opacus' conversion peaks at its largest order and warns that a wider range
    # could tighten the bound: true, and nothing a site admin can act on, so the accountants'
    # conversion keeps it out of every round's log; the ledger and prototype_history_epsilon
    # rely on that rather than filtering again.
    import warnings

    from fedmoco.privacy import prototype_history_epsilon

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ledger = SiteLedger(mechanism, 8.0, 1e-5, 10, [(1000.0, q, 3)])
        assert 0 < ledger.spent() < 0.2
        assert 0 < prototype_history_epsilon([(1000.0, 1.0, 3)], 1e-5) < 0.2


def test_infinite_epsilon_releases_without_noise_and_says_so(site, sent, tmp_path, caplog):
    node = {"data-path": str(site), "dp-epsilon": "inf"}  # benchmark setting: no ledger needed
    with caplog.at_level(logging.WARNING):
        m = metrics(reply := train(train_message(sent, 1), context(node, run_config())))
    assert m["dp-status"] == 1 and m["dp-keys-epsilon"] == float("inf") and n_sent(reply) > 0
    assert "NOT private" in caplog.text


# -- the release depends only on what the server sent -----------------------------------------
@pytest.mark.parametrize("mode", ["prototypes", "keys"])
@pytest.mark.parametrize("release_ema", [0.0, 0.9])
def test_released_vectors_do_not_depend_on_local_training(site, sent, tmp_path, monkeypatch, mode, release_ema):
    """Same received weights + same noise => same release, whatever the site's local state.
    With the EMA release encoder "received weights" means every global model the site got:
    both sites here received the same two."""
    monkeypatch.setattr(client_module, "_secure_generator", lambda: torch.Generator().manual_seed(123))
    run = run_config(**{"key-release": mode, "key-sample-rate": 1.0, "personal-head": True,
                        "prototype-min-cosine": 0.0, "release-ema": release_ema})
    first = shared_arrays(global_model(run, seed=5))
    trained = context(dp_node(site, tmp_path / "a.json"), run)
    train(train_message(first, 1), trained)  # local model, head and queue
    (tmp_path / "b.json").write_text((tmp_path / "a.json").read_text())  # same spending so far
    fresh = context(dp_node(site, tmp_path / "b.json", **{"threads": 1}), {**run, "lr": 0.5})  # other training
    if release_ema:  # the same history of received models, trained on otherwise
        ledger = (tmp_path / "b.json").read_text()
        train(train_message(first, 1), fresh)
        (tmp_path / "b.json").write_text(ledger)
    out_trained = train(train_message(sent, 2), trained)
    out_fresh = train(train_message(sent, 2), fresh)
    a, b = out_trained.content["keys"]["keys"].numpy(), out_fresh.content["keys"]["keys"].numpy()
    assert a.shape[0] > 0 and np.array_equal(a, b)
    # ... while what the two sites trained differs
    diff = max(np.abs(out_trained.content["arrays"][k].numpy() - out_fresh.content["arrays"][k].numpy()).max()
               for k in sent.keys())
    assert diff > 1e-4


def test_first_share_front_loads_the_first_release_and_keeps_the_budget():
    from fedmoco.privacy import prototype_noise_schedule

    ledger = SiteLedger("prototypes", 1.5, 1e-5, 10)
    z_first, z_rest = prototype_noise_schedule(1.5, 1e-5, 10, 1.0, 2.0)
    assert ledger.next_noise(1.0, 2.0) == z_first
    ledger.record(z_first, 1.0)
    # the share applies to the ledger's first release only; the rest share what is left evenly
    z_next = ledger.next_noise(1.0, 2.0)
    assert z_next == pytest.approx(z_rest, rel=0.01)
    for _ in range(9):
        ledger.record(z_next, 1.0)
    assert 1.4 <= ledger.spent() <= 1.5 and ledger.next_noise(1.0, 2.0) is None
    keys = SiteLedger("keys", 1.5, 1e-5, 10)  # per-record keys have no centres: no front-loading
    assert keys.next_noise(0.05, 2.0) == keys.next_noise(0.05)


def _accounted(ledger: SiteLedger) -> float:
    """Epsilon of the ledger's history by the accountant, ignoring any plan."""
    return SiteLedger(ledger.mechanism, ledger.epsilon_budget, ledger.delta, ledger.planned_releases,
                      ledger.history)._epsilon(ledger.history)


@pytest.mark.parametrize("mode, q, share", [("prototypes", 1.0, 2.0), ("keys", 0.05, 1.0)])
def test_a_planned_ledger_prices_every_round_as_the_accountant_does(mode, q, share):
    """The plan (made once, saved in the ledger file) stands in for the accountant in later rounds:
    each round's z and the epsilon after it are the accountant's, through a JSON round trip a round."""
    ledger = SiteLedger(mode, 1.5, 1e-5, 6)
    zs = []
    for _ in range(6):
        ledger = SiteLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))  # a fresh process
        z = ledger.next_noise(q, share)
        zs.append(z)
        ledger.record(z, q)
        assert ledger.spent() == pytest.approx(_accounted(ledger), rel=1e-12)
    assert ledger.next_noise(q) is None and 1.4 <= ledger.spent() <= 1.5
    assert zs[1:] == [zs[1]] * 5 and (zs[0] < zs[1] if share > 1 else zs[0] == zs[1])
    saved = json.loads(json.dumps(ledger.state_dict()))
    assert saved["plan"]["noise"] == zs and saved["epsilon_spent"] == ledger.spent()


def test_a_changed_budget_or_rate_makes_a_new_plan_on_top_of_what_was_spent():
    ledger = SiteLedger("prototypes", 2.0, 1e-5, 6)
    z = ledger.next_noise(1.0)
    ledger.record(z, 1.0)
    ledger.tighten(1.0, 1e-5)
    z_tight = ledger.next_noise(1.0)
    assert z_tight > z and ledger.plan["epsilon_budget"] == 1.0 and ledger.plan["base"] == [[z, 1.0, 1]]
    for _ in range(5):
        ledger.record(z_tight, 1.0)
        assert ledger.spent() == pytest.approx(_accounted(ledger), rel=1e-12)
    assert 0.95 <= ledger.spent() <= 1.0
    rate = SiteLedger("prototypes", 2.0, 1e-5, 6)
    rate.record(rate.next_noise(1.0), 1.0)
    assert rate.next_noise(0.5) < rate.next_noise(1.0)  # a new q is a new plan, each the accountant's
    assert rate.plan["sample_rate"] == 1.0


def test_a_history_off_the_plan_or_a_forged_plan_is_priced_by_the_accountant():
    ledger = SiteLedger("prototypes", 1.5, 1e-5, 4)
    z = ledger.next_noise(1.0)
    ledger.record(z / 2, 1.0)  # not what the plan said: half the noise
    assert ledger.spent() == pytest.approx(_accounted(ledger), rel=1e-12) and ledger.spent() > 1.5 / 4
    ledger = SiteLedger("prototypes", 1.5, 1e-5, 4)
    ledger.record(ledger.next_noise(1.0), 1.0)
    truth = ledger.spent()
    for forge in ({"epsilon": [0.0] * 5}, {"epsilon": [0.0, 2.0, 1.0, 1.2, 1.4]}, {"noise": "many"},
                  {"epsilon": [0.0, 0.4, 0.8, 1.2, 9.0]}):
        state = ledger.state_dict()
        state["plan"] = {**state["plan"], **forge}
        if forge == {"epsilon": [0.0] * 5}:  # well formed: it is believed only while the history follows it
            state["history"] = [{"noise_multiplier": 1.0, "sample_rate": 1.0, "releases": 1}]
        again = SiteLedger.from_state_dict(state)
        assert again.spent() == pytest.approx(_accounted(again), rel=1e-12)
        assert again.spent() > 0
    assert SiteLedger.from_state_dict(ledger.state_dict()).spent() == truth


def test_release_encoder_is_the_moving_average_of_the_received_models():
    """ema = mu * previous + (1 - mu) * received per float tensor, mu = run_config release-ema."""
    from clients.state import SiteState
    from clients.task import moco_config

    run = run_config(**{"release-ema": 0.75, "key-release": "keys"})
    mcfg = moco_config(run)
    received = shared_arrays(global_model(run, seed=1))
    current = {k[len("encoder_q."):]: torch.from_numpy(a.numpy()) for k, a in received.items()
               if k.startswith("encoder_q.")}
    previous = {k: torch.full_like(v, 2.0) for k, v in current.items()}
    msg = train_message(received, 2)
    cpu = torch.device("cpu")

    encoder, state = client_module._release_encoder(msg, mcfg, run, SiteState(release_encoder=previous), cpu)
    name = next(k for k, v in current.items() if v.dim() == 2)  # a linear layer's weight
    assert torch.allclose(encoder.state_dict()[name], 0.75 * 2.0 + 0.25 * current[name], atol=1e-6)
    assert torch.equal(state[name], encoder.state_dict()[name]) and not encoder.training
    # the first round (nothing kept) starts from the received model; 0 keeps nothing
    first, kept = client_module._release_encoder(msg, mcfg, run, SiteState(), cpu)
    assert torch.equal(first.state_dict()[name], current[name]) and torch.equal(kept[name], current[name])
    plain, none = client_module._release_encoder(msg, mcfg, {**run, "release-ema": 0.0},
                                                 SiteState(release_encoder=previous), cpu)
    assert none is None and torch.equal(plain.state_dict()[name], current[name])


def test_the_release_encoder_is_kept_across_rounds_and_on_disk(site, sent, tmp_path):
    from clients.state import RELEASE, STATE_FILE

    run = run_config(**{"key-release": "keys", "key-sample-rate": 1.0})
    ctx = context(dp_node(site, tmp_path / "l.json", **{"state-dir": str(tmp_path / "state")}), run)
    train(train_message(sent, 1), ctx)
    assert RELEASE in ctx.state.array_records
    on_disk = torch.load(tmp_path / "state" / STATE_FILE, weights_only=True)["release_encoder"]
    kept = {k: a.numpy() for k, a in ctx.state.array_records[RELEASE].items()}
    assert kept.keys() == on_disk.keys() and all(np.array_equal(kept[k], on_disk[k].numpy()) for k in kept)
    silent = context({"data-path": str(site)}, run_config(**{"key-release": "none"}))  # nothing kept
    train(train_message(sent, 1), silent)
    assert RELEASE not in silent.state.array_records


def test_no_noise_cannot_step_around_a_ledger(site, sent, tmp_path):
    path = tmp_path / "l.json"
    m = metrics(train(train_message(sent, 1), context(dp_node(site, path, **{"dp-epsilon": 2.0}), run_config())))
    assert m["dp-status"] == 0
    spent = read_ledger(path).spent()
    reply = train(train_message(sent, 2), context(dp_node(site, path, **{"dp-epsilon": "inf"}), run_config()))
    m = metrics(reply)
    assert m["dp-status"] == 8 and reply.content["keys"]["keys"].numpy().shape[0] == 0
    assert read_ledger(path).spent() == spent and read_ledger(path).releases == 1
    assert (m["dp-keys-epsilon"], m["dp-keys-releases"]) == (pytest.approx(spent), 1.0)  # what it spent, not 0
    # a number that overflows to inf is not a request for no noise
    reply = train(train_message(sent, 3), context(dp_node(site, path, **{"dp-epsilon": "1e400"}), run_config()))
    assert reply.has_error() and "write inf to mean no noise" in reply.error.reason


def test_a_ledger_reached_through_a_link_is_one_ledger(tmp_path):
    real = tmp_path / "real" / "ledger.json"
    with locked_ledger(real) as box:
        box["ledger"] = SiteLedger("prototypes", 1.0, 1e-5, 4)
        box["ledger"].record(2.0, 1.0)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ledger.json").symlink_to(real)
    with locked_ledger(tmp_path / "a" / "ledger.json") as box:
        box["ledger"].record(2.0, 1.0)
    assert (tmp_path / "a" / "ledger.json").is_symlink()  # the link is still a link ...
    assert read_ledger(real).releases == 2  # ... and both spends are in the one file
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ledger.json").hardlink_to(real)
    with pytest.raises(ConfigError, match="hard links"):
        with locked_ledger(real):
            pass


@pytest.mark.parametrize("entry", [{"noise_multiplier": 1e300, "sample_rate": 1.0, "releases": 1},
                                   {"noise_multiplier": 1.0, "sample_rate": 2.0, "releases": 1}])
def test_a_ledger_history_no_release_could_have_is_refused(tmp_path, entry):
    path = tmp_path / "l.json"
    with locked_ledger(path) as box:
        box["ledger"] = SiteLedger("prototypes", 1.0, 1e-5, 4)
    state = json.loads(path.read_text())
    state["history"] = [entry]
    state.pop("plan", None)
    path.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="privacy ledger unreadable"):
        read_ledger(path)


@pytest.mark.parametrize("mode", ["prototypes", "keys"])
def test_a_release_of_no_rows_is_refused_before_the_ledger_pays(site, sent, tmp_path, mode):
    # max-keys 0 made the site pay its (front-loaded) first release, then fail the round
    path = tmp_path / "l.json"
    reply = train(train_message(sent, 1), context(dp_node(site, path), run_config(**{"key-release": mode,
                                                                                      "max-keys": 0})))
    assert reply.has_error() and reply.error.code == SITE_MISCONFIGURED
    assert reply.error.reason == (f"configuration: max-keys must be >= 1 for key-release={mode} (a release of no "
                                  "rows would spend budget for nothing)")
    assert not path.exists() or read_ledger(path).history == []
