"""FedMoCo's configure_train / aggregate_train on hand-built messages (no processes)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum
from server_test_helpers import good_metrics, reply_content, reply_from, shifted, tiny_arrays, unit_keys

from fedmoco.errors import ConfigError
from server.queue import GlobalKeyQueue
from server.strategy import FedMoCo, ModelDP, load_server_state
from server.validation import ReplyLimits, decode_arrays

SAMPLING = dict(min_train_nodes=3, min_available_nodes=3)


def make_strategy(tmp_path=None, **kw) -> FedMoCo:
    queue = kw.pop("queue", GlobalKeyQueue(64, 8))
    limits = kw.pop("limits", ReplyLimits(key_dim=8, max_keys=16, max_update_norm=1e6))
    return FedMoCo(queue=queue, limits=limits, queue_sample=kw.pop("queue_sample", 10), seed=0,
                   checkpoint_path=(tmp_path / "state.pt") if tmp_path else None,
                   metrics_path=(tmp_path / "rounds.jsonl") if tmp_path else None, **SAMPLING, **kw)


def offsets(result, ref) -> dict[str, float]:
    """Per array: the (constant) difference between an aggregate and the reference."""
    a, r = decode_arrays(result), decode_arrays(ref)
    return {k: float(np.mean(a[k] - r[k])) for k in r}


def test_each_site_gets_its_own_sample_without_its_own_keys(grid3, caplog):
    s = make_strategy()
    s.queue.enqueue(torch.full((5, 8), 1.0), node_id=101, server_round=1)
    s.queue.enqueue(torch.full((5, 8), 2.0), node_id=102, server_round=1)
    ref = tiny_arrays()
    with caplog.at_level(logging.INFO, logger="flwr.fedmoco.server"):
        msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, ref, ConfigRecord({"lr": 0.1}), grid3)}
    # the log counts what was sent, not the cap: 5, 5 and 10 keys
    assert "and 5-10 global negatives each to 3 site(s)" in caplog.text
    assert set(msgs) == {101, 102, 103}
    sample = {n: m.content["queue"]["keys"].numpy() for n, m in msgs.items()}
    assert (sample[101] == 2).all() and sample[101].shape == (5, 8)
    assert (sample[102] == 1).all() and sample[102].shape == (5, 8)
    assert sample[103].shape == (10, 8)  # queue_sample caps it
    for m in msgs.values():
        assert m.metadata.message_type == "train"
        assert set(m.content.keys()) == {"arrays", "config", "queue", "centres"}
        # one set of public centres for every site, merged from the whole queue (both sites' rows)
        assert np.array_equal(m.content["centres"]["centres"].numpy(), s.queue.centres(s.prototype_centres).numpy())
        assert m.content["config"]["server-round"] == 1 and m.content["config"]["lr"] == 0.1
        assert list(m.content["arrays"].keys()) == list(ref.keys())


def test_no_centres_are_merged_when_the_sites_release_no_prototypes(grid3, monkeypatch):
    s = make_strategy(prototype_centres=0)  # server/app.py: key-release keys or none
    s.queue.enqueue(torch.from_numpy(unit_keys(5)), node_id=101, server_round=1)
    monkeypatch.setattr(GlobalKeyQueue, "centres", lambda *a, **k: pytest.fail("merged centres for no one"))
    msgs = list(s.configure_train(2, tiny_arrays(), ConfigRecord(), grid3))
    assert all(m.content["centres"]["centres"].shape == (0, 8) for m in msgs)
    with pytest.raises(ConfigError, match="prototype-centres"):
        make_strategy(prototype_centres=-1)


def test_the_round_log_says_when_no_global_negatives_were_sent(grid3, caplog):
    s = make_strategy()  # key-release=none: the queue stays empty
    with caplog.at_level(logging.INFO, logger="flwr.fedmoco.server"):
        msgs = list(s.configure_train(1, tiny_arrays(), ConfigRecord(), grid3))
    assert all(m.content["queue"]["keys"].shape == (0, 8) for m in msgs)
    assert "MB) and no global negatives to 3 site(s)" in caplog.text
    s.queue.enqueue(torch.full((20, 8), 1.0), node_id=999, server_round=1)  # a site outside this round
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flwr.fedmoco.server"):
        list(s.configure_train(2, tiny_arrays(), ConfigRecord(), grid3))
    assert "MB) and 10 global negatives each to 3 site(s)" in caplog.text


def test_own_keys_included_when_asked(grid3):
    s = make_strategy(exclude_own_keys=False)
    s.queue.enqueue(torch.full((5, 8), 1.0), node_id=101, server_round=1)
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, tiny_arrays(), ConfigRecord(), grid3)}
    assert msgs[101].content["queue"]["keys"].shape == (5, 8)


def test_fedavg_weighted_by_examples_and_keys_join_the_queue(grid3, tmp_path):
    s = make_strategy(tmp_path)
    ref = tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid3)
    replies = [reply_from(101, reply_content(shifted(ref, 1.0), unit_keys(3, seed=1), good_metrics(10))),
               reply_from(102, reply_content(shifted(ref, 3.0), unit_keys(4, seed=2), good_metrics(30)))]
    arrays, metrics = s.aggregate_train(1, replies)
    assert all(v == pytest.approx(2.5, abs=1e-5) for v in offsets(arrays, ref).values())
    assert all(a.numpy().dtype == np.float32 for a in arrays.values())
    assert metrics["train-loss"] == pytest.approx(0.5)
    assert s.queue.counts_by_site() == {101: 3, 102: 4}
    assert np.allclose(s.queue.keys[:3].numpy(), unit_keys(3, seed=1))
    state = load_server_state(tmp_path / "state.pt")
    assert state["round"] == 1
    assert torch.allclose(state["arrays"][next(iter(ref.keys()))], torch.from_numpy(next(iter(arrays.values())).numpy()))
    assert state["queue"]["count"] == 7
    assert state["ledger"]["sites"][101]["dp-keys-epsilon"] == 1.0


def test_bad_replies_are_rejected_with_a_reason_and_the_round_goes_on(tmp_path, caplog):
    from server.inprocess import InProcessGrid

    s = make_strategy(tmp_path)
    ref = tiny_arrays()
    s.configure_train(2, ref, ConfigRecord(), InProcessGrid({n: (lambda m, c: m, None) for n in range(101, 106)}))
    name = "encoder_q.head.2.weight"
    wrong = shifted(ref, 0.0)
    from flwr.app import Array
    wrong[name] = Array(np.zeros((16, 8), np.float32))
    nan = shifted(ref, np.nan)
    replies = [reply_from(101, reply_content(shifted(ref, 1.0), unit_keys(2), good_metrics())),
               reply_from(102, reply_content(wrong, unit_keys(2), good_metrics())),
               reply_from(103, reply_content(nan, unit_keys(9, dim=8) * 0 + unit_keys(9), good_metrics())),
               reply_from(104, reply_content(shifted(ref, 5.0), unit_keys(2, dim=16), good_metrics())),
               reply_from(105, error="site data unavailable: /data/site-5: data folder does not exist")]
    with caplog.at_level(logging.INFO, logger="flwr.fedmoco.server"):
        arrays, _ = s.aggregate_train(2, replies)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in offsets(arrays, ref).values())
    assert s.queue.counts_by_site() == {101: 2}
    text = caplog.text
    assert f"round 2: rejected reply from node 102: arrays '{name}' has shape (16, 8), expected (8, 16)" in text
    assert "round 2: rejected reply from node 103: arrays 'encoder_q.backbone" in text and "non-finite" in text
    assert "round 2: rejected reply from node 104: keys 'keys' has shape (2, 16), expected (n, 8)" in text
    assert "round 2: node 105 sent no update (code 2): site data unavailable: /data/site-5" in text
    import json
    record = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[-1])
    assert (record["accepted"], record["rejected"], record["errors"]) == (1, 3, 1)
    assert {s["node"]: s["status"] for s in record["sites"]}[105] == "error"


def _round_of_one_reply_and_one_error(s: FedMoCo, grid3) -> tuple:
    """(the global model, replies) of round 1 sent to grid3's three nodes: node 101 answers with
    a good update, node 102 with an error, node 103 not at all."""
    ref = tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid3)
    return ref, [reply_from(101, reply_content(shifted(ref, 1.0), unit_keys(2), good_metrics())),
                 reply_from(102, error="boom")]


def test_too_few_accepted_replies_keep_the_model_and_queue(grid3, tmp_path, caplog):
    s = make_strategy(tmp_path, min_replies=2)
    ref, replies = _round_of_one_reply_and_one_error(s, grid3)
    with caplog.at_level(logging.WARNING, logger="flwr.fedmoco.server"):
        arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is None and metrics is None
    assert len(s.queue) == 0
    assert "fewer than min-replies 2" in caplog.text
    state = load_server_state(tmp_path / "state.pt")  # still checkpointed, with the old model
    assert state["round"] == 1
    assert np.array_equal(state["arrays"][next(iter(ref.keys()))].numpy(), next(iter(ref.values())).numpy())


def test_a_site_that_never_replies_is_named_counted_and_logged(grid3, tmp_path, caplog):
    """grid3's three nodes are sent the model; 103 never answers (round-timeout). It was in no
    count, no JSON line and no log line, and the round read "1/1 replies accepted" (found by an
    audit)."""
    import json

    s = make_strategy(tmp_path, min_replies=1)
    _, replies = _round_of_one_reply_and_one_error(s, grid3)
    with caplog.at_level(logging.INFO, logger="flwr.fedmoco.server"):
        s.aggregate_train(1, replies)
    line = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[-1])
    assert (line["sent"], line["replies"], line["accepted"], line["errors"], line["no-reply"]) == (3, 2, 1, 1, 1)
    silent = [site for site in line["sites"] if site["status"] == "no-reply"]
    assert [(x["node"], x["reason"]) for x in silent] == [(103, "no reply within round-timeout")]
    assert "round 1: node 103 sent no reply within round-timeout" in caplog.text
    assert "round 1: 1/3 replies accepted (0 rejected, 1 errors, 1 no reply)" in caplog.text


def test_round_offset_numbers_rounds_of_a_resumed_run(grid3, tmp_path):
    s = make_strategy(tmp_path, round_offset=4)
    ref = tiny_arrays()
    msgs = list(s.configure_train(1, ref, ConfigRecord(), grid3))
    assert {m.content["config"]["server-round"] for m in msgs} == {5}
    assert {m.metadata.group_id for m in msgs} == {"5"}
    s.aggregate_train(1, [reply_from(101, reply_content(ref, unit_keys(1), good_metrics()))])
    assert load_server_state(tmp_path / "state.pt")["round"] == 5
    assert s.queue.round[0] == 5


@pytest.mark.parametrize("aggregator, expected", [
    (FedMedian(**SAMPLING), 2.0),
    (FedTrimmedAvg(beta=0.34, **SAMPLING), 2.0),
    (Krum(num_malicious_nodes=0, **SAMPLING), None),  # picks one of the two close updates
])
def test_robust_aggregation_resists_an_outlier(grid3, aggregator, expected):
    s = make_strategy(aggregator=aggregator)
    ref = tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid3)
    replies = [reply_from(101, reply_content(shifted(ref, 1.0), unit_keys(1), good_metrics(10))),
               reply_from(102, reply_content(shifted(ref, 2.0), unit_keys(1), good_metrics(10))),
               reply_from(103, reply_content(shifted(ref, 50.0), unit_keys(1), good_metrics(1000)))]
    arrays, _ = s.aggregate_train(1, replies)
    got = offsets(arrays, ref)
    if expected is None:
        assert {round(v, 4) for v in got.values()} in ({1.0}, {2.0})
    else:
        assert all(v == pytest.approx(expected, abs=1e-5) for v in got.values())
    assert all(a.numpy().dtype == np.float32 for a in arrays.values())
    assert s.queue.counts_by_site() == {101: 1, 102: 1, 103: 1}


def test_a_failing_aggregator_loses_the_round_not_the_run(grid3, tmp_path, caplog, monkeypatch):
    from flwr.serverapp.exception import AggregationError

    agg = FedTrimmedAvg(beta=0.2, **SAMPLING)

    def fail(server_round, replies):
        raise AggregationError("Trimmed mean could not be computed")

    monkeypatch.setattr(agg, "aggregate_train", fail)
    s = make_strategy(tmp_path, aggregator=agg)
    ref = tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid3)
    with caplog.at_level(logging.ERROR, logger="flwr.fedmoco.server"):
        arrays, _ = s.aggregate_train(1, [reply_from(101, reply_content(ref, unit_keys(1), good_metrics()))])
    assert arrays is None and len(s.queue) == 0
    assert "round 1: aggregation failed (AggregationError: Trimmed mean could not be computed)" in caplog.text
    assert load_server_state(tmp_path / "state.pt")["round"] == 1


def test_model_dp_clips_each_update_and_accounts_epsilon(grid3):
    dp = ModelDP(noise=1e-6, clip=1.0, delta=1e-5)
    s = make_strategy(model_dp=dp)
    ref = tiny_arrays()
    n_params = sum(a.numpy().size for a in ref.values())
    s.configure_train(1, ref, ConfigRecord(), grid3)  # sent to 3 sites
    big = 10.0 / np.sqrt(n_params)  # update norm 10 -> clipped to 1
    replies = [reply_from(101, reply_content(shifted(ref, big), unit_keys(1), good_metrics(10))),
               reply_from(102, reply_content(shifted(ref, big), unit_keys(1), good_metrics(1000)))]
    arrays, _ = s.aggregate_train(1, replies)
    # two clipped updates of norm 1, divided by the 3 sites the round was sent to
    expected = 2 * (big / 10.0) / 3
    assert all(v == pytest.approx(expected, rel=1e-3) for v in offsets(arrays, ref).values())
    eps1 = dp.epsilon()
    s.configure_train(2, arrays, ConfigRecord(), grid3)
    s.aggregate_train(2, [reply_from(101, reply_content(arrays, unit_keys(1), good_metrics()))])
    assert 0 < eps1 < dp.epsilon() and dp.releases == 2
    with pytest.raises(ConfigError, match="FedAvg only"):
        make_strategy(model_dp=ModelDP(noise=1.0, clip=1.0, delta=1e-5), aggregator=FedMedian(**SAMPLING))


def test_model_dp_noise_has_the_calibrated_scale(grid3):
    dp = ModelDP(noise=2.0, clip=0.5, delta=1e-5)
    s = make_strategy(model_dp=dp)
    ref = tiny_arrays()
    s.configure_train(1, ref, ConfigRecord(), grid3)
    arrays, _ = s.aggregate_train(1, [reply_from(101, reply_content(ref, unit_keys(1), good_metrics()))])
    diff = np.concatenate([(decode_arrays(arrays)[k] - v).ravel() for k, v in decode_arrays(ref).items()])
    assert diff.std() == pytest.approx(2.0 * 0.5 / 3, rel=0.05)  # z * C / n_sent


def test_collapse_is_warned_once_and_its_end_reported(grid3, caplog):
    s = make_strategy()  # key dimension 8: spread unit vectors have emb-std 1/sqrt(8) = 0.354
    ref = tiny_arrays()

    def round_with(r: int, emb_std: float, share: float = 0.0) -> str:
        s.configure_train(r, ref, ConfigRecord(), grid3)
        replies = [reply_from(n, reply_content(shifted(ref, 0.0), unit_keys(2, seed=n),
                                               good_metrics(10, **{"emb-std": emb_std, "global-share": share})))
                   for n in (101, 102)]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flwr.fedmoco.server"):
            s.aggregate_train(r, replies)
        return caplog.text

    text = round_with(1, 0.02, share=0.8)  # under 0.1 / sqrt(8) = 0.0354
    assert ("round 1: the sites' embeddings are nearly identical (emb-std 0.0200, under 0.0354; spread over the "
            "sphere it would be 1/sqrt(8) = 0.354); the global negatives took 80% of the sites' InfoNCE softmax. "
            "A random-init encoder starts near this") in text
    assert [r.levelname for r in caplog.records if "nearly identical" in r.message] == ["WARNING"]
    assert "nearly identical" not in round_with(2, 0.01)  # once, not every round
    assert "round 3: the sites' embeddings have spread again (emb-std 0.2000, above 0.0354)" in round_with(3, 0.2)
    assert "nearly identical" not in round_with(4, 0.3) and "spread again" not in caplog.text
    again = round_with(5, 0.001)  # without global negatives, the line says nothing of them
    assert "round 5: the sites' embeddings are nearly identical (emb-std 0.0010" in again
    assert "global negatives took" not in again


def test_collapse_threshold_and_rounds_without_an_emb_std():
    from server.strategy import concentrated

    assert concentrated(0.0087, 128) is True and concentrated(0.0089, 128) is False  # 0.1 / sqrt(128) = 0.00884
    assert concentrated(float("nan"), 128) is None and concentrated(None, 128) is None


def test_an_incomplete_server_checkpoint_is_one_line(tmp_path):
    from fedmoco.checkpoint import atomic_save
    from server.strategy import SERVER_STATE_FORMAT, SERVER_STATE_VERSION

    atomic_save({"format": SERVER_STATE_FORMAT, "version": SERVER_STATE_VERSION, "round": 2, "arrays": {},
                 "ledger": {"sites": {}}}, tmp_path / "state.pt")
    with pytest.raises(ConfigError) as err:
        load_server_state(tmp_path / "state.pt")
    assert str(err.value) == f"{tmp_path / 'state.pt'}: server checkpoint is incomplete (missing queue)"


def test_a_resumed_run_still_keeps_a_named_sites_own_summaries_from_it(grid3, tmp_path):
    from flwr.app import ConfigRecord as Config

    def named(node, name, keys):
        content = reply_content(tiny_arrays(), keys, good_metrics(10))
        content["site"] = Config({"name": name})
        return reply_from(node, content)

    first = make_strategy(tmp_path)
    first.configure_train(1, tiny_arrays(), ConfigRecord(), grid3)
    first.aggregate_train(1, [named(101, "hospital-a", unit_keys(3, seed=1)),
                              named(102, "hospital-b", unit_keys(4, seed=2))])
    assert first.queue.counts_by_site() == {"hospital-a": 3, "hospital-b": 4}
    # the resumed run: the same queue, the sites back under new node ids (grid3 holds 101-103)
    resumed = make_strategy(queue=GlobalKeyQueue(64, 8))
    resumed.queue.load_state_dict(first.queue.state_dict())
    resumed.configure_train(2, tiny_arrays(), ConfigRecord(), grid3)
    resumed.aggregate_train(2, [named(103, "hospital-a", unit_keys(3, seed=3)),
                                named(101, "hospital-b", unit_keys(4, seed=4))])
    assert resumed.queue.counts_by_site() == {"hospital-a": 6, "hospital-b": 8}  # two sites, not four
    msgs = {m.metadata.dst_node_id: m for m in resumed.configure_train(3, tiny_arrays(), ConfigRecord(), grid3)}
    assert msgs[103].content["queue"]["keys"].shape == (8, 8)  # hospital-b's only: none of its own
    assert msgs[101].content["queue"]["keys"].shape == (6, 8)


def test_a_resumed_run_never_hands_a_site_its_own_summaries_before_it_has_a_name(grid3, caplog):
    """After a resume the sites come back under new node ids; entries from before carry names
    (or the old ids). Until a node's reply tells its name it gets none of those entries; once
    named, it gets every other site's and none of its own."""
    s = make_strategy(round_offset=4, queue_sample=64)
    s.queue.enqueue(torch.full((5, 8), 1.0), node_id="hospital-a", server_round=4)  # before the resume
    s.queue.enqueue(torch.full((5, 8), 2.0), node_id="hospital-b", server_round=3)
    s.queue.enqueue(torch.full((4, 8), 3.0), node_id=102, server_round=5)  # this run's round 1
    with caplog.at_level(logging.INFO, logger="flwr.fedmoco.server"):
        msgs = {m.metadata.dst_node_id: m for m in s.configure_train(2, tiny_arrays(), ConfigRecord(), grid3)}
    keys = {n: m.content["queue"]["keys"].numpy() for n, m in msgs.items()}
    assert (keys[101] == 3).all() and keys[101].shape == (4, 8)  # only this run's entries
    assert keys[102].shape == (0, 8)  # its own, and nothing from before the resume
    assert "3 site(s) not known by name yet got none of the global negatives from before the resume" in caplog.text
    s._claim_name(101, "hospital-a")
    keys = {m.metadata.dst_node_id: m.content["queue"]["keys"].numpy()
            for m in s.configure_train(3, tiny_arrays(), ConfigRecord(), grid3)}
    assert sorted(np.unique(keys[101]).tolist()) == [2.0, 3.0] and keys[101].shape == (9, 8)  # not hospital-a's
    assert keys[103].shape == (4, 8)  # still unnamed: this run's entries only
    s.queue.expire(10, 5)  # the entries from before the resume age out: nothing left to say
    s.queue.enqueue(torch.full((2, 8), 4.0), node_id=101, server_round=6)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flwr.fedmoco.server"):
        list(s.configure_train(6, tiny_arrays(), ConfigRecord(), grid3))
    assert "not known by name" not in caplog.text
