"""A site that lies about num-examples cannot take over FedAvg.

Two honest sites move every weight by +1 (10 examples) and +3 (30 examples); the liar moves
it by +50. Each test compares the aggregate with the hand-computed weighted mean.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord
from server_test_helpers import good_metrics, reply_content, reply_from, shifted, tiny_arrays, unit_keys

from fedmoco.errors import ConfigError
from server.queue import GlobalKeyQueue
from server.strategy import FedMoCo
from server.validation import DEFAULT_MAX_EXAMPLES, ExampleCaps, ReplyLimits, decode_arrays

LIAR_SHIFT = 50.0


def strategy(tmp_path, caps: ExampleCaps | None = None) -> FedMoCo:
    return FedMoCo(queue=GlobalKeyQueue(64, 8), limits=ReplyLimits(key_dim=8, max_keys=16, max_update_norm=None),
                   queue_sample=4, seed=0, metrics_path=tmp_path / "rounds.jsonl", example_caps=caps,
                   min_train_nodes=3, min_available_nodes=3)


def one_round(s: FedMoCo, grid, liars: dict[int, float]):
    """Honest 101 (+1, 10 ex.) and 102 (+3, 30 ex.), and liars {node: claimed num-examples}."""
    ref = tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid)
    replies = [reply_from(101, reply_content(shifted(ref, 1.0), unit_keys(2, seed=1), good_metrics(10))),
               reply_from(102, reply_content(shifted(ref, 3.0), unit_keys(2, seed=2), good_metrics(30)))]
    replies += [reply_from(node, reply_content(shifted(ref, LIAR_SHIFT), unit_keys(2, seed=node), good_metrics(n)))
                for node, n in liars.items()]
    arrays, _ = s.aggregate_train(1, replies)
    a, r = decode_arrays(arrays), decode_arrays(ref)
    offsets = np.array([float(np.mean(a[k] - r[k])) for k in r])
    return offsets


def last_round(tmp_path) -> dict:
    return json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[-1])


def test_a_reply_no_check_foresaw_is_rejected_and_the_round_goes_on(grid3, tmp_path, caplog, monkeypatch):
    """If checking one reply raises (a shape of lie no check foresaw), that reply is rejected
    and logged; the honest sites' round is aggregated, and the ServerApp keeps running."""
    import server.strategy as strategy_module

    real = strategy_module.validate_reply
    lying = None

    def validate(content, *args, **kwargs):
        if content is lying:
            raise TypeError("unhashable type: 'list'")
        return real(content, *args, **kwargs)

    monkeypatch.setattr(strategy_module, "validate_reply", validate)
    caplog.set_level(logging.WARNING, logger="flwr.fedmoco.server")
    s, ref = strategy(tmp_path), tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid3)
    lying = reply_content(shifted(ref, LIAR_SHIFT), unit_keys(2, seed=3), good_metrics(10))
    arrays, _ = s.aggregate_train(1, [reply_from(101, reply_content(shifted(ref, 1.0), unit_keys(2, seed=1),
                                                                    good_metrics(10))),
                                      reply_from(102, reply_content(shifted(ref, 3.0), unit_keys(2, seed=2),
                                                                    good_metrics(30))),
                                      reply_from(103, lying)])
    a, r = decode_arrays(arrays), decode_arrays(ref)
    assert np.allclose([float(np.mean(a[k] - r[k])) for k in r], (10 + 30 * 3) / 40, atol=1e-4)
    sites = {e["node"]: e for e in last_round(tmp_path)["sites"]}
    assert sites[103]["status"] == "rejected" and sites[103]["reason"] == "reply could not be checked (TypeError)"
    assert "round 1: reply from node 103 could not be checked" in caplog.text


def test_1e300_examples_count_as_the_site_cap(grid3, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="flwr.fedmoco.server")
    s = strategy(tmp_path, ExampleCaps.parse(1000, "103=20"))
    offsets = one_round(s, grid3, {103: 1e300})
    expected = (10 * 1.0 + 30 * 3.0 + 20 * LIAR_SHIFT) / 60  # the liar weighs 20, its cap
    assert np.allclose(offsets, expected, atol=1e-4)
    site = {x["node"]: x for x in last_round(tmp_path)["sites"]}[103]
    assert (site["status"], site["num-examples"], site["num-examples-claimed"]) == ("accepted", 20, 1e300)
    assert "node 103 claims 1e+300 examples; its weight counts 20" in caplog.text


def test_two_sites_at_1_7e308_neither_zero_the_model_nor_take_it_over(tmp_path):
    # Unclipped, 1.7e308 + 1.7e308 overflows to inf and every weight factor becomes 0.
    from server.inprocess import InProcessGrid

    s = strategy(tmp_path, ExampleCaps(default=40))
    offsets = one_round(s, InProcessGrid({n: (lambda m, c: m, None) for n in (101, 102, 103, 104)}),
                        {103: 1.7e308, 104: 1.7e308})
    expected = (10 * 1.0 + 30 * 3.0 + 40 * LIAR_SHIFT + 40 * LIAR_SHIFT) / 120
    assert np.isfinite(offsets).all() and np.allclose(offsets, expected, atol=1e-4)
    assert last_round(tmp_path)["examples"] == 10 + 30 + 40 + 40


def test_the_default_cap_bounds_the_share_as_documented(grid3, tmp_path):
    s = strategy(tmp_path)
    offsets = one_round(s, grid3, {103: 1e300})
    share = DEFAULT_MAX_EXAMPLES / (DEFAULT_MAX_EXAMPLES + 40)
    assert np.allclose(offsets, (1 - share) * 2.5 + share * LIAR_SHIFT, atol=1e-3)


@pytest.mark.parametrize("claim, shown", [(float("nan"), "is NaN"), (-5, "is -5, expected a whole number >= 1"),
                                          (0, "is 0, expected a whole number >= 1"),
                                          (12.5, "is 12.5, expected a whole number >= 1"),
                                          (float("inf"), "is inf")])
def test_nonsense_counts_reject_the_reply(grid3, tmp_path, caplog, claim, shown):
    caplog.set_level(logging.WARNING, logger="flwr.fedmoco.server")
    s = strategy(tmp_path)
    offsets = one_round(s, grid3, {103: claim})
    assert np.allclose(offsets, 2.5, atol=1e-5)  # the honest weighted mean, (10*1 + 30*3) / 40
    assert f"rejected reply from node 103: metrics 'num-examples' {shown}" in caplog.text
    assert last_round(tmp_path)["rejected"] == 1


def test_a_named_site_gets_the_cap_set_for_its_name(grid3, tmp_path, caplog):
    from flwr.app import ConfigRecord as Config

    caplog.set_level(logging.WARNING, logger="flwr.fedmoco.server")
    s = strategy(tmp_path, ExampleCaps.parse(1000, "hospital-c=20,104=999"))
    ref = tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid3)
    liar = reply_content(shifted(ref, LIAR_SHIFT), unit_keys(2, seed=3), good_metrics(1e300))
    liar["site"] = Config({"name": "hospital-c"})
    replies = [reply_from(101, reply_content(shifted(ref, 1.0), unit_keys(2, seed=1), good_metrics(10))),
               reply_from(102, reply_content(shifted(ref, 3.0), unit_keys(2, seed=2), good_metrics(30))),
               reply_from(103, liar)]
    arrays, _ = s.aggregate_train(1, replies)
    a, r = decode_arrays(arrays), decode_arrays(ref)
    assert np.allclose([float(np.mean(a[k] - r[k])) for k in r], (10 + 90 + 20 * LIAR_SHIFT) / 60, atol=1e-4)
    assert "hospital-c (node 103) claims 1e+300 examples; its weight counts 20" in caplog.text


def test_caps_by_node_id_win_over_site_name_and_default():
    # a node id is authenticated (Flower's node keys), a name is what a site calls itself: a
    # node capped by id keeps its cap whatever name it claims, and digits never name a site's cap
    caps = ExampleCaps.parse(500, ' hospital-a=20 , 7=30, "b"=40, 102=100000')
    assert caps.cap(7) == 30 and caps.cap(8) == 500 and caps.cap(9, "b") == 40 and caps.cap(8, "hospital-a") == 20
    assert caps.cap(7, "unknown") == 30 and caps.cap(7, "hospital-a") == 30
    assert caps.cap(103, "102") == 500 and caps.cap(102) == 100000


@pytest.mark.parametrize("default, spec, message", [
    (0, "", "max-examples-per-site: expected an integer >= 1, got 0"),
    (10, "a=0", "site-example-caps a=0: expected an integer >= 1"),
    (10, "a=1.5", "site-example-caps: 'a=1.5' is not name=N with N an integer"),
    (10, "a", "site-example-caps: 'a' is not name=N with N an integer"),
    # the last one won: a pasted line raised hospital-a's cap from 1000 to 900000 in silence
    (10, "hospital-a=1000,hospital-b=2000,hospital-a=900000",
     "site-example-caps: 'hospital-a' is given twice (1000 and 900000); give each site one cap"),
    (10, '101=5,"101"=6', "site-example-caps: '101' is given twice (5 and 6); give each site one cap"),
])
def test_bad_caps_are_config_errors(default, spec, message):
    with pytest.raises(ConfigError) as err:
        ExampleCaps.parse(default, spec)
    assert str(err.value) == message


def test_update_norm_is_recorded_per_site(grid3, tmp_path):
    s = strategy(tmp_path)
    one_round(s, grid3, {})
    n_params = sum(a.numpy().size for a in tiny_arrays().values())
    norms = {x["node"]: x["update-norm"] for x in last_round(tmp_path)["sites"] if x["status"] != "no-reply"}
    assert norms[101] == pytest.approx(math.sqrt(n_params) * 1.0, rel=1e-5)
    assert norms[102] == pytest.approx(math.sqrt(n_params) * 3.0, rel=1e-5)


def test_a_site_cannot_take_another_sites_name_and_its_cap(grid3, tmp_path, caplog):
    # hospital-a (node 101) has a generous cap by name; node 103 claims that name to get it
    from flwr.app import ConfigRecord as Config

    caplog.set_level(logging.WARNING, logger="flwr.fedmoco.server")
    s = strategy(tmp_path, ExampleCaps.parse(20, "hospital-a=1000"))
    ref = tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid3)
    honest = reply_content(shifted(ref, 1.0), unit_keys(2, seed=1), good_metrics(10))
    honest["site"] = Config({"name": "hospital-a"})
    liar = reply_content(shifted(ref, LIAR_SHIFT), unit_keys(2, seed=3), good_metrics(1000))
    liar["site"] = Config({"name": "hospital-a"})
    arrays, _ = s.aggregate_train(1, [reply_from(101, honest),
                                      reply_from(102, reply_content(shifted(ref, 3.0), unit_keys(2, seed=2),
                                                                    good_metrics(30))),
                                      reply_from(103, liar)])
    a, r = decode_arrays(arrays), decode_arrays(ref)
    assert np.allclose([float(np.mean(a[k] - r[k])) for k in r], (10 + 20 * 3) / 30, atol=1e-4)  # capped 20
    assert "rejected reply from node 103: site: name 'hospital-a' is node 101's in this run" in caplog.text
    assert s.site_names == {101: "hospital-a"}
    sites = {e["node"]: e for e in last_round(tmp_path)["sites"]}
    assert sites[103]["status"] == "rejected" and "site" not in sites[103]


def test_a_rejected_reply_under_a_name_does_not_give_the_node_that_name_later(grid3, tmp_path, caplog):
    """Node 103 sends a reply under hospital-a's name that is rejected (NaN weights), before
    hospital-a replies; then unnamed replies claiming 1e9 examples. Its name was recorded
    before validation, so those later replies got hospital-a's cap of 1000."""
    from flwr.app import ConfigRecord as Config

    caplog.set_level(logging.WARNING, logger="flwr.fedmoco.server")
    s = strategy(tmp_path, ExampleCaps.parse(20, "hospital-a=1000"))
    ref = tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid3)
    forged = reply_content(shifted(ref, float("nan")), unit_keys(2, seed=3), good_metrics(10))
    forged["site"] = Config({"name": "hospital-a"})
    honest = reply_content(shifted(ref, 1.0), unit_keys(2, seed=1), good_metrics(10))
    honest["site"] = Config({"name": "hospital-a"})
    s.aggregate_train(1, [reply_from(103, forged), reply_from(101, honest),
                          reply_from(102, reply_content(shifted(ref, 3.0), unit_keys(2, seed=2), good_metrics(30)))])
    assert s.site_names == {101: "hospital-a"}
    offsets = one_round(s, grid3, {103: 10**9})
    assert np.allclose(offsets, (10 * 1 + 20 * 3 + 20 * LIAR_SHIFT) / 50, atol=1e-3)  # 103 capped at 20
    sites = {e["node"]: e for e in last_round(tmp_path)["sites"]}
    assert "site" not in sites[103] and "node 103 claims 1e+09 examples; its weight counts 20" in caplog.text


def test_a_reply_that_declares_no_keys_but_holds_some_cannot_crash_or_fill_the_queue(grid3, tmp_path, caplog):
    from flwr.app import Array, ArrayRecord

    s = strategy(tmp_path)
    ref = tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid3)

    def declaring(values, shape):
        honest = Array(values)
        return ArrayRecord({"keys": Array(dtype=honest.dtype, shape=shape, stype=honest.stype, data=honest.data)})

    hidden = reply_content(shifted(ref, 1.0), unit_keys(5, seed=4), good_metrics(
        10, **{"dp-status": 4.0, "dp-keys-releases": 0.0, "dp-keys-epsilon": 0.0}))
    hidden["keys"] = declaring(unit_keys(5, seed=4), (0, 8))
    scalar = reply_content(shifted(ref, 1.0), unit_keys(0), good_metrics(10))
    scalar["keys"] = declaring(unit_keys(0), ())
    arrays, _ = s.aggregate_train(1, [reply_from(101, reply_content(shifted(ref, 1.0), unit_keys(2, seed=1),
                                                                    good_metrics(10))),
                                      reply_from(102, hidden), reply_from(103, scalar)])
    assert arrays is not None and s.queue.counts_by_site() == {101: 2}
    statuses = {e["node"]: e["status"] for e in last_round(tmp_path)["sites"]}
    assert statuses == {101: "accepted", 102: "rejected", 103: "rejected"}


def test_a_resumed_run_gives_its_sites_their_names_back_under_new_node_ids(grid3, tmp_path):
    # the checkpoint knew hospital-a as node 7; after the restart it is node 101
    from flwr.app import ConfigRecord as Config

    s = FedMoCo(queue=GlobalKeyQueue(64, 8), limits=ReplyLimits(key_dim=8, max_keys=16, max_update_norm=None),
                queue_sample=4, seed=0, metrics_path=tmp_path / "rounds.jsonl", site_names={7: "hospital-a"},
                min_train_nodes=3, min_available_nodes=3)
    ref = tiny_arrays()
    s.configure_train(3, ref, ConfigRecord(), grid3)
    named = reply_content(shifted(ref, 1.0), unit_keys(2, seed=1), good_metrics(10))
    named["site"] = Config({"name": "hospital-a"})
    arrays, _ = s.aggregate_train(3, [reply_from(101, named)])
    assert arrays is not None
    assert {e["node"]: e["status"] for e in last_round(tmp_path)["sites"]} == {101: "accepted", 102: "no-reply",
                                                                               103: "no-reply"}
    assert s.site_names[101] == "hospital-a"


def test_one_node_replying_twice_or_a_node_not_sent_the_round_counts_once_or_not_at_all(grid3, tmp_path, caplog):
    """A second reply from one node would double its FedAvg weight (and break model DP's
    clip / n bound); a node the round was not sent to has no say. Both are rejected and logged:
    the aggregate is the two honest sites' weighted mean, as if the extra replies never came."""
    caplog.set_level(logging.WARNING, logger="flwr.fedmoco.server")
    s, ref = strategy(tmp_path), tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid3)
    honest = [reply_from(101, reply_content(shifted(ref, 1.0), unit_keys(2, seed=1), good_metrics(10))),
              reply_from(102, reply_content(shifted(ref, 3.0), unit_keys(2, seed=2), good_metrics(30)))]
    again = reply_from(102, reply_content(shifted(ref, 3.0), unit_keys(2, seed=2), good_metrics(30)))
    stranger = reply_from(999, reply_content(shifted(ref, LIAR_SHIFT), unit_keys(2, seed=9), good_metrics(30)))
    arrays, _ = s.aggregate_train(1, honest + [again, again, stranger])
    a, r = decode_arrays(arrays), decode_arrays(ref)
    assert np.allclose([float(np.mean(a[k] - r[k])) for k in r], (10 * 1 + 30 * 3) / 40, atol=1e-4)
    assert len(s.queue) == 4  # two keys from each honest site, once
    sites = last_round(tmp_path)["sites"]
    assert [(e["node"], e["status"]) for e in sites] == [(101, "accepted"), (102, "accepted"), (102, "rejected"),
                                                         (102, "rejected"), (999, "rejected"), (103, "no-reply")]
    assert sites[2]["reason"] == "a second reply from this node in this round"
    assert sites[4]["reason"] == "this node was not sent this round's model"
    assert "round 1: rejected reply from node 999: this node was not sent this round's model" in caplog.text


@pytest.mark.parametrize("name, value", [("dp-keys-epsilon", 1.7e308), ("dp-keys-budget", 1e300),
                                         ("dp-keys-releases", 1e200), ("skipped", 1e300)])
def test_privacy_figures_and_counts_beyond_any_honest_site_reject_the_reply(name, value):
    """A dp-keys-epsilon of 1.7e308 was accepted: the privacy plot's axis overflowed and the
    ServerApp ended in a traceback after its last round. inf (released without noise) passes."""
    from server.validation import check_metrics

    from flwr.app import MetricRecord

    reasons = check_metrics(MetricRecord(good_metrics(10, **{name: value})))
    assert reasons == [f"metrics {name!r} is {value:.3g}, expected it in [0, {'1e+12' if name == 'skipped' else '1e+09'}]"]
    if name in ("dp-keys-epsilon", "dp-keys-budget"):
        assert check_metrics(MetricRecord(good_metrics(10, **{name: math.inf}))) == []


def test_an_npz_archive_in_place_of_an_array_is_rejected_by_name():
    import io

    from flwr.app import Array, ArrayRecord

    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(3, np.float32))
    fake = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=buf.getvalue())
    with pytest.raises(ValueError, match="array 'w' does not decode to one array \\(got NpzFile\\)"):
        decode_arrays(ArrayRecord({"w": fake}))


def test_key_rows_at_the_edge_of_the_tolerance_are_queued_as_unit_rows(grid3, tmp_path):
    """Rows whose float64 norm is within the server's 1e-3 of 1 can be off by more than 1e-3
    in float32, where every site checks them: queued as sent, one liar's rows cost every site
    its global negatives. The server queues them renormalised."""
    import torch

    s, ref = strategy(tmp_path), tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid3)
    edge = (unit_keys(8, seed=5).astype(np.float64) * (1 + 0.999e-3)).astype(np.float32)
    assert np.abs(np.linalg.norm(edge.astype(np.float64), axis=1) - 1).max() <= 1e-3  # the server accepts them
    replies = [reply_from(101, reply_content(shifted(ref, 1.0), unit_keys(2, seed=1), good_metrics(10))),
               reply_from(102, reply_content(shifted(ref, 3.0), unit_keys(2, seed=2), good_metrics(30))),
               reply_from(103, reply_content(shifted(ref, 1.0), edge, good_metrics(10)))]
    s.aggregate_train(1, replies)
    held = s.queue.keys[: len(s.queue)]
    assert len(s.queue) == 12 and ((held.norm(dim=1) - 1).abs() < 1e-6).all()
    assert torch.allclose(held[-8:], torch.from_numpy(unit_keys(8, seed=5)), atol=1e-6)


def test_a_plot_that_fails_is_logged_and_the_run_keeps_its_result(tmp_path, monkeypatch, caplog):
    """The plots are drawn after the encoder is written; one that raises (a figure no check
    foresaw) ended the ServerApp in a traceback and lost the run's result."""
    import server.app as server_app

    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(server_app, "plot_federation", broken)
    caplog.set_level(logging.WARNING, logger="flwr.fedmoco.server")
    assert server_app._plots(tmp_path / "rounds.jsonl", tmp_path / "plots", 8) == []
    assert "plots not drawn (LinAlgError: Singular matrix); rounds.jsonl holds every figure" in caplog.text
