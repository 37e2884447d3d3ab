"""The ClientApp's train handler, called directly with built Messages and Contexts."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from client_test_helpers import (context, dp_node, global_model, make_images_site, run_config, state_tensors,
                                 train_message, unit_rows)

from clients.app import SITE_DATA_UNAVAILABLE, SITE_MISCONFIGURED, Renormalized, train
from clients.state import MODEL, SITE, TRAINER
from clients.task import load_shared, shared_arrays, shared_state
from fedmoco.data import Normalization
from fedmoco.train import Trainer
from server.validation import REQUIRED_METRICS, ReplyLimits, decode_arrays, validate_reply


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_images_site(tmp_path_factory.mktemp("site"))


@pytest.fixture
def captured(monkeypatch):
    """What the model looked like when local training started, per call."""
    calls = []
    original = Trainer.train_epoch

    def spy(self, loader, **kw):
        calls.append({"model": {k: v.clone() for k, v in self.model.state_dict().items()},
                      "step": self.global_step, "negatives": kw.get("extra_negatives"),
                      "centres": kw.get("extra_centres")})
        return original(self, loader, **kw)

    monkeypatch.setattr(Trainer, "train_epoch", spy)
    return calls


@pytest.mark.parametrize("mode", ["prototypes", "keys"])
def test_reply_holds_exactly_weights_keys_and_metrics(site, tmp_path, mode):
    run = run_config(**{"key-release": mode, "prototype-min-cosine": 0.0})
    sent = shared_arrays(global_model(run))
    reply = train(train_message(sent, 1), context(dp_node(site, tmp_path / "ledger.json"), run))
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "keys", "metrics"}
    assert set(reply.content["metrics"].keys()) == set(REQUIRED_METRICS)
    assert list(reply.content["arrays"].keys()) == list(sent.keys())
    keys = reply.content["keys"]["keys"].numpy()
    assert keys.dtype == np.float32 and keys.ndim == 2 and keys.shape[1] == 16 and keys.shape[0] <= 64
    # what the server will check, with the server's own code
    limits = ReplyLimits(key_dim=16, max_keys=64, max_update_norm=None)
    assert validate_reply(reply.content, decode_arrays(sent), limits) == []
    m = reply.content["metrics"]
    assert m["num-examples"] == 24 and m["dp-keys-releases"] == 1 and 0 < m["dp-keys-epsilon"] < 8
    assert m["dp-status"] == 0 and m["dp-keys-budget"] == 8.0 and keys.shape[0] >= 1
    # it trained: the weights moved
    diff = [np.abs(a.numpy() - sent[k].numpy()).max() for k, a in reply.content["arrays"].items()]
    assert max(diff) > 0


def test_missing_or_empty_data_folder_is_a_clear_error_reply(tmp_path, caplog):
    run = run_config()
    sent = shared_arrays(global_model(run))
    missing = tmp_path / "no-such-site"
    with caplog.at_level(logging.ERROR):
        reply = train(train_message(sent, 1), context({"data-path": str(missing)}, run))
    assert reply.has_error() and reply.error.code == SITE_DATA_UNAVAILABLE
    assert reply.error.reason == "site data unavailable: the data folder (node_config data-path) does not exist"
    empty = tmp_path / "empty"
    empty.mkdir()
    reply = train(train_message(sent, 1), context({"data-path": str(empty)}, run))
    assert reply.has_error() and reply.error.code == SITE_DATA_UNAVAILABLE
    assert reply.error.reason == "site data unavailable: data folder is empty (no files)"  # DataError.public
    no_path = train(train_message(sent, 1), context({}, run))
    assert no_path.has_error() and no_path.error.code == SITE_MISCONFIGURED
    assert "data-path" in no_path.error.reason


def test_channel_mismatch_is_reported(site):
    """A site that pins its own channels (node_config data-options) and differs from the
    federation's encoder is told so in one line."""
    run = run_config(**{"in-channels": 3})
    node = {"data-path": str(site), "data-options": "channels=1"}
    reply = train(train_message(shared_arrays(global_model(run)), 1), context(node, run))
    assert reply.has_error() and reply.error.code == SITE_MISCONFIGURED
    assert "1 channel(s) but the federation's encoder takes 3" in reply.error.reason


def test_an_images_site_on_auto_channels_takes_the_federations(site):
    """With channels=auto (the default) an images site reads its files with the federation's
    in-channels (grayscale replicated), not with a guess from its first files, which one RGB
    file would turn."""
    run = run_config(**{"in-channels": 3})
    reply = train(train_message(shared_arrays(global_model(run)), 1), context({"data-path": str(site)}, run))
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] == 24


def test_simulation_sites_find_their_data_by_partition_id(tmp_path):
    make_images_site(tmp_path / "site-1", seed=1)
    run = run_config(**{"demo-root": str(tmp_path)})
    reply = train(train_message(shared_arrays(global_model(run)), 1), context({"partition-id": 1}, run))
    assert not reply.has_error()


def test_state_survives_rounds_in_the_context(site, captured):
    run = run_config()
    ctx = context({"data-path": str(site)}, run)
    g = global_model(run)
    train(train_message(shared_arrays(g), 1), ctx)
    assert {MODEL, TRAINER, SITE} <= set(ctx.state.keys())
    queue_after_1 = int(ctx.state[MODEL]["queue.count"].numpy())
    assert queue_after_1 == 16  # 2 steps x batch 8
    assert ctx.state[SITE]["rounds-done"] == 1
    reply = train(train_message(shared_arrays(g), 2), ctx)
    assert int(ctx.state[MODEL]["queue.count"].numpy()) == 32  # the local queue kept growing
    assert captured[1]["step"] == 2  # the optimizer/schedule continued
    assert ctx.state[SITE]["rounds-done"] == 2 and not reply.has_error()


def test_local_ema_key_encoder_is_kept_across_rounds(site, captured):
    run = run_config(**{"key-encoder": "local-ema"})
    ctx = context({"data-path": str(site)}, run)
    g = global_model(run)
    train(train_message(shared_arrays(g), 1), ctx)
    saved_k = state_tensors(ctx.state[MODEL], "encoder_k.")
    train(train_message(shared_arrays(global_model(run, seed=1)), 2), ctx)
    at_start = captured[1]["model"]
    for k, v in saved_k.items():
        assert torch.equal(at_start[k], v), k
    # and it is not a copy of the freshly loaded global query encoder
    new_q = shared_state(global_model(run, seed=1))
    assert not torch.equal(at_start["encoder_k.head.2.weight"], new_q["encoder_q.head.2.weight"])


def test_reset_key_encoder_copies_the_global_query_encoder(site, captured):
    run = run_config(**{"key-encoder": "reset"})
    ctx = context({"data-path": str(site)}, run)
    train(train_message(shared_arrays(global_model(run)), 1), ctx)
    g2 = shared_state(global_model(run, seed=1))
    train(train_message(shared_arrays(global_model(run, seed=1)), 2), ctx)
    at_start = captured[1]["model"]
    for k, v in g2.items():
        assert torch.equal(at_start[k], v), k  # query encoder = global
        assert torch.equal(at_start["encoder_k." + k[len("encoder_q."):]], v), k  # key encoder = global too


def test_unknown_key_encoder_policy_is_refused(site):
    run = run_config(**{"key-encoder": "frozen"})
    reply = train(train_message(shared_arrays(global_model(run)), 1), context({"data-path": str(site)}, run))
    assert reply.has_error() and reply.error.code == SITE_MISCONFIGURED
    assert "key-encoder must be local-ema or reset, got 'frozen'" in reply.error.reason


def test_personal_head_stays_on_the_site(site, captured):
    run = run_config(**{"personal-head": True})
    ctx = context({"data-path": str(site)}, run)
    train(train_message(shared_arrays(global_model(run)), 1), ctx)
    own_head = state_tensors(ctx.state[MODEL], "encoder_q.head.")
    g2 = shared_state(global_model(run, seed=1))
    train(train_message(shared_arrays(global_model(run, seed=1)), 2), ctx)
    at_start = captured[1]["model"]
    for k, v in own_head.items():
        assert torch.equal(at_start[k], v), k
    assert torch.equal(at_start["encoder_q.backbone.features.0.weight"], g2["encoder_q.backbone.features.0.weight"])


def test_fedema_blends_by_divergence():
    run = run_config()
    local, g = global_model(run, seed=0), global_model(run, seed=1)
    weights = shared_state(g)
    before = shared_state(local)
    dist = float(torch.sqrt(sum((weights[k] - before[k]).pow(2).sum() for k in weights)))
    lam = 0.5 / dist  # mu = 0.5: halfway
    mu = load_shared(local, weights, fedema_lambda=lam)
    assert mu == pytest.approx(0.5)
    after = shared_state(local)
    for k in weights:
        assert torch.allclose(after[k], 0.5 * before[k] + 0.5 * weights[k], atol=1e-6)
    far = global_model(run, seed=0)
    assert load_shared(far, weights, fedema_lambda=1e9) == 1.0  # drifted far: keeps its own
    assert torch.equal(shared_state(far)["encoder_q.head.2.weight"], before["encoder_q.head.2.weight"])
    assert load_shared(global_model(run, seed=0), weights) == 0.0  # plain replacement


def test_fedema_is_applied_from_the_second_round(site, captured):
    run = run_config(**{"fedema-lambda": 1e9})  # mu = 1: the site keeps its own encoder
    ctx = context({"data-path": str(site)}, run)
    train(train_message(shared_arrays(global_model(run)), 1), ctx)
    own = state_tensors(ctx.state[MODEL], "encoder_q.")
    train(train_message(shared_arrays(global_model(run, seed=1)), 2), ctx)
    for k, v in own.items():
        assert torch.equal(captured[1]["model"][k], v), k


def test_restarted_run_resumes_site_state_from_state_dir(site, tmp_path, captured):
    run = run_config()
    node = {"data-path": str(site), "state-dir": str(tmp_path / "state")}
    g = shared_arrays(global_model(run))
    first = context(node, run)
    train(train_message(g, 1), first)
    train(train_message(g, 2), first)
    queue_after_2 = first.state[MODEL]["queue.buffer"].numpy().copy()
    assert (tmp_path / "state" / "site-state.pt").is_file()

    # `flwr run` again: the server resumes at round 3, every site's Context is empty.
    restarted = context(node, run)
    train(train_message(g, 3), restarted)
    assert np.array_equal(captured[-1]["model"]["queue.buffer"].numpy(), queue_after_2)
    assert restarted.state[SITE]["rounds-done"] == 3

    # a brand-new run (round 1) starts cold, and so does a model of another configuration
    train(train_message(g, 1), context(node, run))
    assert int(captured[-1]["model"]["queue.count"]) == 0
    other = run_config(**{"local-queue-size": 48})
    train(train_message(shared_arrays(global_model(other)), 5), context(node, other))
    assert int(captured[-1]["model"]["queue.count"]) == 0


def test_a_site_that_joins_late_follows_the_federation_lr_schedule(site, captured):
    run = run_config()
    train(train_message(shared_arrays(global_model(run)), 3), context({"data-path": str(site)}, run))
    assert captured[0]["step"] == 2 * 2  # two earlier rounds x 2 steps


def test_global_negatives_are_used_and_bad_ones_ignored(site, captured, caplog):
    run = run_config()
    g = shared_arrays(global_model(run))
    train(train_message(g, 1, negatives=unit_rows(20)), context({"data-path": str(site)}, run))
    assert captured[0]["negatives"].shape == (20, 16)
    with caplog.at_level(logging.WARNING):
        reply = train(train_message(g, 1, negatives=unit_rows(20, dim=8)), context({"data-path": str(site)}, run))
    assert not reply.has_error() and captured[1]["negatives"] is None
    assert "ignoring global negatives of shape (20, 8)" in caplog.text


def test_false_negative_cancellation_buckets_by_the_servers_centres(site, captured):
    g = shared_arrays(global_model(run_config()))
    negatives, centres = unit_rows(20), unit_rows(4, seed=1)
    train(train_message(g, 1, negatives=negatives, centres=centres), context({"data-path": str(site)}, run_config()))
    assert np.allclose(captured[0]["centres"].numpy(), centres)
    # No centres from the server: the global negatives are their own buckets.
    train(train_message(g, 1, negatives=negatives), context({"data-path": str(site)}, run_config()))
    assert np.allclose(captured[1]["centres"].numpy(), negatives)
    # Turned off, or nothing to cancel: no buckets.
    off = run_config(**{"cancel-false-negatives": False})
    train(train_message(g, 1, negatives=negatives, centres=centres), context({"data-path": str(site)}, off))
    train(train_message(g, 1, centres=centres), context({"data-path": str(site)}, run_config()))
    assert captured[2]["centres"] is None and captured[3]["centres"] is None


@pytest.mark.parametrize("mode", ["prototypes", "keys"])
def test_the_site_noises_its_release_with_the_z_its_ledger_paid_for(site, tmp_path, monkeypatch, mode):
    """What a site sends is noised at exactly the z its ledger recorded, round after round:
    a release at z = 0 would send raw embeddings while the ledger reports them private."""
    import fedmoco.privacy as privacy
    from clients.ledger import read_ledger

    used: list[float] = []
    mechanism = "release_prototypes" if mode == "prototypes" else "privatize_keys"
    original = getattr(privacy, mechanism)

    def spy(*args, **kwargs):
        used.append(float(args[3] if mode == "prototypes" else args[1]))  # the noise multiplier z
        return original(*args, **kwargs)

    monkeypatch.setattr(privacy, mechanism, spy)
    run = run_config(**{"key-release": mode})
    sent = shared_arrays(global_model(run))
    path = tmp_path / "ledger.json"
    paid = []
    for r in (1, 2):
        assert train(train_message(sent, r), context(dp_node(site, path), run)).content["metrics"]["dp-status"] == 0
        paid.append(read_ledger(path).history[-1][0])
    assert len(used) == 2 and used == paid and min(used) > 0


def test_key_noise_is_not_reproducible_from_the_seed(site, tmp_path):
    run = run_config(**{"key-release": "keys", "key-sample-rate": 1.0, "max-keys": 4})
    g = shared_arrays(global_model(run))
    node_a, node_b = dp_node(site, tmp_path / "a.json"), dp_node(site, tmp_path / "b.json")
    a = train(train_message(g, 1), context(node_a, run)).content["keys"]["keys"].numpy()
    b = train(train_message(g, 1), context(node_b, run)).content["keys"]["keys"].numpy()
    assert a.shape == b.shape == (4, 16)
    assert not np.allclose(a, b)


def test_renormalized_maps_site_units_to_federation_units():
    src, dst = Normalization([0.5], [0.25]), Normalization([0.2], [0.1])
    raw = torch.rand(1, 4, 4)
    view = (raw - 0.5) / 0.25
    ds = Renormalized([(view, view), None], src, dst)
    out = ds[0][0]
    assert torch.allclose(out, (raw - 0.2) / 0.1, atol=1e-5)
    assert ds[1] is None and len(ds) == 2


def test_a_server_round_outside_the_run_is_a_misconfiguration_not_hours_of_work(site):
    """server-round drives the site's LR-schedule catch-up loop: one outside 1..num-server-rounds
    is refused in one line instead of stepping a schedule a billion times."""
    run = run_config()
    sent = shared_arrays(global_model(run))
    reply = train(train_message(sent, 10**9), context({"data-path": str(site)}, run))
    assert reply.has_error() and reply.error.code == SITE_MISCONFIGURED
    assert reply.error.reason == "configuration: server-round 1000000000 is outside 1..3 (run_config num-server-rounds)"


@pytest.mark.parametrize("bad,reason", [
    ("nan", "holds NaN or infinite values"),
    ("shape", "has shape (1,), expected"),
    ("int", "holds int64 values, expected floating point"),
    # finite as sent (float64), inf as the model's float32: paid for, then diverged (an audit)
    ("f64", "holds NaN or infinite values (as float32)"),
    ("huge", "holds values beyond +-1e+08"),  # finite, and diverged in training after the ledger paid
])
def test_an_unusable_global_model_is_refused_before_the_release_spends_anything(site, tmp_path, bad, reason):
    """NaN weights used to be found only after the round's release had paid its ledger, and
    (1,)-shaped ones broadcast into a constant model that the site trained without a word."""
    from flwr.app import Array, ArrayRecord

    from clients.ledger import read_ledger

    run = run_config(**{"key-release": "prototypes"})
    good = shared_arrays(global_model(run))
    name = next(k for k in good.keys() if k.endswith("weight"))
    value = good[name].numpy()
    broken = {"nan": np.full_like(value, np.nan), "shape": np.ones((1,), np.float32),
              "int": np.ones(value.shape, np.int64), "f64": np.full(value.shape, 1e39, np.float64),
              "huge": np.full_like(value, 1e30)}[bad]
    arrays = ArrayRecord({k: (Array(broken) if k == name else a) for k, a in good.items()})
    ledger = tmp_path / "ledger.json"
    reply = train(train_message(arrays, 1), context(dp_node(site, ledger), run))
    assert reply.has_error() and reply.error.code == 102
    assert reply.error.reason.startswith(f"the server's global model is unusable: {name!r} {reason}")
    assert not ledger.exists() or read_ledger(ledger).spent() == 0.0
    ok = train(train_message(good, 1), context(dp_node(site, ledger), run))
    assert not ok.has_error() and read_ledger(ledger).spent() > 0  # the same site, a usable model: it pays


@pytest.mark.parametrize("record", ["queue", "centres"])
def test_a_queue_or_centres_record_that_does_not_decode_is_ignored_not_a_failed_round(site, tmp_path, caplog, record):
    """Bytes that are no array of the declared shape raised ValueError: a bad queue failed the
    round; bad centres failed it after the ledger had paid for the prototype release (found by an
    audit). Both are ignored with a warning, as docs/federation.md says."""
    from flwr.app import Array, ArrayRecord

    from clients.ledger import read_ledger

    run = run_config(**{"key-release": "prototypes", "queue-sample": 64})
    msg = train_message(shared_arrays(global_model(run)), 1)
    msg.content[record] = ArrayRecord({"x": Array(dtype="float32", shape=(8, 16), stype="numpy.ndarray",
                                                  data=b"garbage, not an array")})
    ledger = tmp_path / "ledger.json"
    with caplog.at_level(logging.WARNING):
        reply = train(msg, context(dp_node(site, ledger), run))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    what = "global negatives" if record == "queue" else "the server's centres"
    assert f"ignoring {what}: it does not decode (ValueError)" in caplog.text
    assert read_ledger(ledger).spent() > 0 and "keys" in reply.content.array_records  # paid, and released


def test_global_negatives_beyond_the_runs_sample_or_not_unit_are_ignored(site, captured, caplog):
    run = run_config(**{"queue-sample": 30})
    g = shared_arrays(global_model(run))
    with caplog.at_level(logging.WARNING):
        train(train_message(g, 1, negatives=unit_rows(31)), context({"data-path": str(site)}, run))
        train(train_message(g, 1, negatives=1e3 * unit_rows(20)), context({"data-path": str(site)}, run))
        train(train_message(g, 1, negatives=unit_rows(30)), context({"data-path": str(site)}, run))
    assert captured[0]["negatives"] is None and captured[1]["negatives"] is None
    assert captured[2]["negatives"].shape == (30, 16)
    assert "ignoring global negatives of shape (31, 16) (expected (M, 16), M <= 30)" in caplog.text
    assert "ignoring 20 of the 20 rows of global negatives: not unit vectors" in caplog.text


def test_a_row_that_is_not_unit_costs_the_site_that_row_only(site, captured, caplog):
    """One bad row among the server's sample took every other row with it: one lying site's
    row, sampled into every site's negatives, would switch the global queue off for all."""
    run = run_config(**{"queue-sample": 30})
    g = shared_arrays(global_model(run))
    rows = unit_rows(30)
    rows[7] *= 1.01
    with caplog.at_level(logging.WARNING):
        train(train_message(g, 1, negatives=rows), context({"data-path": str(site)}, run))
    kept = captured[0]["negatives"]
    assert kept.shape == (29, 16)
    assert torch.equal(kept, torch.from_numpy(np.delete(rows, 7, axis=0)))
    assert "ignoring 1 of the 30 rows of global negatives: not unit vectors" in caplog.text


@pytest.mark.parametrize("over,reason", [
    # the server's ranges, checked again at the site: a million local epochs once ran on
    ({"local-epochs": 1_000_000}, "configuration: run_config local-epochs must be in [1, 10000], got 1000000"),
    ({"local-queue-size": 20_000_000}, "configuration: run_config local-queue-size must be in [1, 1048576], "
                                       "got 20000000"),
    ({"release-ema": float("inf")}, "configuration: run_config release-ema must be in [0, 1), got inf"),
    # each of these failed the round with code 102 and no reason, the first two after the ledger
    # had paid for the release (found by an audit): now 101 naming the key, the ledger untouched
    ({"warmup-epochs": float("inf")}, "configuration: run_config warmup-epochs must be >= 0 and finite, got inf"),
    ({"warmup-epochs": 100.0}, "configuration: run_config warmup-epochs 100 is longer than the federation's 3 local "
                               "epochs (num-server-rounds x local-epochs)"),
    ({"input-mean": "abc"}, "configuration: run_config input-mean: expected numbers separated by commas, got 'abc'"),
    ({"input-mean": "0.5,0.5"}, "configuration: run_config input-mean: 2 values for 1 channels"),
    ({"cancel-false-negatives": "maybe"}, "configuration: run_config cancel-false-negatives: expected bool, got "
                                          "'maybe'"),
    ({"personal-head": "x"}, "configuration: run_config personal-head: expected bool, got 'x'"),
    # was reported as dp-status 7, "the privacy ledger could not be read or written"
    ({"prototype-sample-rate": 5.0}, "configuration: run_config prototype-sample-rate must be in (0, 1], got 5.0"),
])
def test_release_settings_out_of_range_are_a_configuration_error(site, tmp_path, over, reason):
    run = run_config(**{"key-release": "prototypes", **over})
    reply = train(train_message(shared_arrays(global_model(run)), 1),
                  context(dp_node(site, tmp_path / "ledger.json"), run))
    assert reply.has_error() and reply.error.code == SITE_MISCONFIGURED
    assert reply.error.reason == reason
    assert not (tmp_path / "ledger.json").exists()


@pytest.mark.parametrize("value", [None, 2.5, "abc", True, float("nan")])
def test_a_round_number_that_is_not_a_whole_number_is_refused(site, value):
    """A missing server-round was taken as round 1, 2.5 as round 2, and "abc" ended as a bare ValueError."""
    from flwr.app import ConfigRecord

    run = run_config()
    msg = train_message(shared_arrays(global_model(run)), 1)
    config = {} if value is None else {"server-round": value}
    msg.content["config"] = ConfigRecord(config)
    reply = train(msg, context({"data-path": str(site)}, run))
    assert reply.has_error() and reply.error.code == SITE_MISCONFIGURED
    assert reply.error.reason.startswith("configuration: the server's server-round must be a whole number, got ")


def test_a_site_trains_with_amp_on_its_gpu_unless_its_node_config_says_amp_false(site):
    # local training follows TrainConfig (AMP and channels_last on CUDA, nothing on a CPU); it
    # used to turn both off for every site, so a hospital's GPU trained in float32
    from clients.app import _settings

    run = run_config()
    _, _, tcfg = _settings(context({"data-path": str(site)}, run))
    assert tcfg.amp and tcfg.channels_last
    _, _, tcfg = _settings(context({"data-path": str(site), "amp": "false"}, run))
    assert not tcfg.amp
    _, _, tcfg = _settings(context({"data-path": str(site), "amp": False}, run))
    assert not tcfg.amp
    reply = train(train_message(shared_arrays(global_model(run)), 1),
                  context({"data-path": str(site), "amp": "maybe"}, run))
    assert reply.has_error() and reply.error.code == SITE_MISCONFIGURED
    assert reply.error.reason == "configuration: node_config amp: expected true or false, got 'maybe'"


@pytest.mark.parametrize("threads", [1_000_000, -1, "many", 1.5, True])
def test_a_thread_count_beyond_the_machine_is_refused_in_one_line(site, threads):
    # a million threads crashed the site process (SIGSEGV in torch's pool), with no message
    import os

    run = run_config()
    reply = train(train_message(shared_arrays(global_model(run)), 1),
                  context({"data-path": str(site), "threads": threads}, run))
    assert reply.has_error() and reply.error.code == SITE_MISCONFIGURED
    assert reply.error.reason == (f"configuration: node_config threads: expected a whole number from 0 (torch's "
                                  f"default) to {os.cpu_count()} (this machine's CPUs), got {threads!r}")


def test_a_thread_count_within_the_machine_is_taken(site):
    from clients.app import _settings

    assert _settings(context({"data-path": str(site), "threads": 1}, run_config()))[0]["threads"] == 1
    assert _settings(context({"data-path": str(site), "threads": "0"}, run_config()))[0]["threads"] == 0
