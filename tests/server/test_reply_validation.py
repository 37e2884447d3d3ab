"""validate_reply: every way a reply can be wrong gives a one-line reason naming it."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from server_test_helpers import good_metrics, reply_content, shifted, tiny_arrays, unit_keys

from server.validation import ReplyLimits, decode_arrays, validate_reply

LIMITS = ReplyLimits(key_dim=8, max_keys=16, max_update_norm=5.0)


@pytest.fixture(scope="module")
def ref():
    return tiny_arrays()


def check(content: RecordDict, ref: ArrayRecord, limits: ReplyLimits = LIMITS) -> list[str]:
    return validate_reply(content, decode_arrays(ref), limits)


def replace(arrays: ArrayRecord, name: str, value: np.ndarray) -> ArrayRecord:
    out = ArrayRecord({k: a for k, a in arrays.items()})
    out[name] = Array(value)
    return out


def test_a_good_reply_passes(ref):
    assert check(reply_content(ref, unit_keys(5), good_metrics()), ref) == []
    # no keys at all (budget exhausted) is fine too
    assert check(reply_content(ref, np.zeros((0, 8), np.float32), good_metrics(**{"dp-keys-exhausted": 1.0})),
                 ref) == []


def test_wrong_shape_names_the_array_and_both_shapes(ref):
    name = "encoder_q.head.2.weight"
    assert ref[name].shape == (8, 16)
    bad = replace(ref, name, np.zeros((16, 8), np.float32))
    assert check(reply_content(bad, unit_keys(2), good_metrics()), ref) == [
        f"arrays '{name}' has shape (16, 8), expected (8, 16)"]


def test_dtype_nan_missing_and_unexpected_arrays(ref):
    name = next(iter(ref.keys()))
    as64 = replace(ref, name, ref[name].numpy().astype(np.float64))
    assert check(reply_content(as64, unit_keys(2), good_metrics()), ref) == [
        f"arrays '{name}' has dtype float64, expected float32"]
    nan = ref[name].numpy().copy()
    nan.flat[0] = np.nan
    nan.flat[1] = np.inf
    assert check(reply_content(replace(ref, name, nan), unit_keys(2), good_metrics()), ref) == [
        f"arrays '{name}' has 2 non-finite value(s)"]
    fewer = ArrayRecord({k: a for k, a in ref.items() if k != name})
    extra = replace(ref, "encoder_k.secret", np.zeros(3, np.float32))
    assert check(reply_content(fewer, unit_keys(2), good_metrics()), ref)[0].startswith("arrays: missing 1 of")
    assert check(reply_content(extra, unit_keys(2), good_metrics()), ref) == [
        "arrays: 1 unexpected (first: 'encoder_k.secret')"]


def test_update_norm_bound(ref):
    n_params = sum(a.numpy().size for a in ref.values())
    step = 6.0 / np.sqrt(n_params)  # update norm 6 > 5
    reasons = check(reply_content(shifted(ref, step), unit_keys(2), good_metrics()), ref)
    assert len(reasons) == 1 and "update norm 6" in reasons[0] and "max-update-norm 5" in reasons[0]
    assert check(reply_content(shifted(ref, step / 2), unit_keys(2), good_metrics()), ref) == []
    unbounded = ReplyLimits(key_dim=8, max_keys=16, max_update_norm=None)
    assert check(reply_content(shifted(ref, 100.0), unit_keys(2), good_metrics()), ref, unbounded) == []


@pytest.mark.parametrize("keys, reason", [
    (unit_keys(3, dim=16), "keys 'keys' has shape (3, 16), expected (n, 8)"),
    (unit_keys(3).reshape(-1), "keys 'keys' has shape (24,), expected (n, 8)"),
    (unit_keys(17), "keys: 17 keys exceed max-keys 16"),
    (unit_keys(3) * 2, "keys: 3 key(s) are not unit vectors (largest |norm - 1| = 1 > 0.001)"),
    (np.full((2, 8), np.nan, np.float32), "keys: 16 non-finite value(s)"),
])
def test_bad_keys(ref, keys, reason):
    content = RecordDict({"arrays": ref, "keys": ArrayRecord({"keys": Array(keys.astype(np.float32))}),
                          "metrics": MetricRecord(good_metrics())})
    assert check(content, ref) == [reason]


def test_without_releases_a_reply_may_hold_no_key(ref):
    """key-release=none (the default): honest sites send (0, D). A liar's 16 rows were accepted
    and, as the only global keys, became every other site's negatives."""
    from clients.task import RUN_DEFAULTS

    limits = ReplyLimits.of_run({**RUN_DEFAULTS, "key-release": "none"}, key_dim=8)
    assert check(reply_content(ref, np.zeros((0, 8), np.float32), good_metrics()), ref, limits) == []
    assert check(reply_content(ref, unit_keys(16), good_metrics()), ref, limits) == [
        "keys: 16 keys exceed key-release=none 0"]


def test_a_prototype_reply_may_hold_at_most_the_sites_centres(ref):
    """In prototypes mode an honest site sends at most min(prototype-centres, max-keys) rows;
    more would let one site fill the queue and pull the public centres its way."""
    from clients.task import RUN_DEFAULTS

    run = {**RUN_DEFAULTS, "key-release": "prototypes", "prototype-centres": 8, "max-keys": 16,
           "max-update-norm": 5.0}
    limits = ReplyLimits.of_run(run, key_dim=8)
    assert (limits.max_keys, limits.max_keys_rule, limits.max_update_norm) == (8, "prototype-centres", 5.0)
    assert check(reply_content(ref, unit_keys(8), good_metrics()), ref, limits) == []
    assert check(reply_content(ref, unit_keys(9), good_metrics()), ref, limits) == [
        "keys: 9 keys exceed prototype-centres 8"]
    keys_mode = ReplyLimits.of_run({**run, "key-release": "keys"}, key_dim=8)
    assert (keys_mode.max_keys, keys_mode.max_keys_rule) == (16, "max-keys")
    assert ReplyLimits.of_run({**run, "max-keys": 4, "max-update-norm": 0.0}, key_dim=8) == ReplyLimits(8, 4, None)


def test_keys_record_shape_and_dtype(ref):
    two = RecordDict({"arrays": ref, "keys": ArrayRecord({"a": Array(unit_keys(1)), "b": Array(unit_keys(1))}),
                      "metrics": MetricRecord(good_metrics())})
    assert check(two, ref) == ["keys: expected one array named 'keys', got ['a', 'b']"]
    # one array under another name: the doc's table names it, and nothing else may ride along
    pixels = RecordDict({"arrays": ref, "keys": ArrayRecord({"pixels": Array(unit_keys(1))}),
                         "metrics": MetricRecord(good_metrics())})
    assert check(pixels, ref) == ["keys: expected one array named 'keys', got ['pixels']"]
    f64 = reply_content(ref, unit_keys(2), good_metrics())
    f64["keys"] = ArrayRecord({"keys": Array(unit_keys(2).astype(np.float64))})
    assert check(f64, ref) == ["keys 'keys' has dtype float64, expected float32"]
    no_keys = RecordDict({"arrays": ref, "metrics": MetricRecord(good_metrics())})
    assert check(no_keys, ref) == ["record 'keys' is missing"]


def test_a_reply_shaped_to_crash_the_checks_is_one_rejection(ref):
    """A list where a number belongs, and metric names that would forge log lines, are
    reasons to reject the reply, in one bounded printable line: never an exception."""
    status_list = good_metrics()
    status_list["dp-status"] = [0.0]
    assert check(reply_content(ref, unit_keys(2), status_list), ref) == [
        "metrics 'dp-status' is a list, expected a number", "metrics 'dp-status' is [0.0], expected one of "
        + str(list(range(10)))]
    forged = good_metrics()
    for i in range(7):
        forged[f"x{i}\nINFO : round 9: all sites accepted" + "y" * 100] = 1.0
    (reason,) = check(reply_content(ref, unit_keys(2), forged), ref)
    assert "\n" not in reason and reason.endswith(" and 2 more") and len(reason) < 400


def test_metrics(ref):
    m = good_metrics()
    del m["train-loss"]
    m["patient-count"] = 3
    assert check(reply_content(ref, unit_keys(2), m), ref) == [
        "metrics: missing train-loss", "metrics: unexpected patient-count"]
    for lie in (0, -3, 12.5):
        assert check(reply_content(ref, unit_keys(2), good_metrics(**{"num-examples": lie})), ref) == [
            f"metrics 'num-examples' is {lie}, expected a whole number >= 1"]
    assert check(reply_content(ref, unit_keys(2), good_metrics(**{"num-examples": float("nan")})), ref) == [
        "metrics 'num-examples' is NaN"]
    # A whole number, however large, passes validation; the strategy clips it to the site's cap.
    assert check(reply_content(ref, unit_keys(2), good_metrics(**{"num-examples": 1e300})), ref) == []
    assert check(reply_content(ref, unit_keys(2), good_metrics(**{"train-loss": float("nan")})), ref) == [
        "metrics 'train-loss' is NaN"]
    # a round whose steps all ran on an empty queue has no negative scores: NaN is legitimate
    assert check(reply_content(ref, unit_keys(2), good_metrics(**{"neg-mean": float("nan")})), ref) == []
    # global-share is a share of the softmax: outside [0, 1] is a lie; NaN when the filter hid it
    for lie in (-0.1, 1.5):
        assert check(reply_content(ref, unit_keys(2), good_metrics(**{"global-share": lie})), ref) == [
            f"metrics 'global-share' is {lie}, expected a share in [0, 1]"]
    assert check(reply_content(ref, unit_keys(2), good_metrics(**{"global-share": float("nan")})), ref) == []
    no_release = good_metrics(**{"dp-keys-releases": 0.0, "dp-keys-epsilon": 0.0})
    assert "accounts no release" in check(reply_content(ref, unit_keys(2), no_release), ref)[0]


def test_unexpected_records_are_refused(ref):
    content = reply_content(ref, unit_keys(2), good_metrics())
    content["images"] = ArrayRecord({"x": Array(np.zeros((1, 1, 16, 16), np.float32))})
    content["config"] = ConfigRecord({"PatientName": "Demo^Patient"})
    assert check(content, ref) == ["record 'images' (ArrayRecord) is not allowed",
                                   "record 'config' (ConfigRecord) is not allowed"]
    swapped = RecordDict({"arrays": MetricRecord({"a": 1.0}), "keys": ArrayRecord(), "metrics": MetricRecord({})})
    assert check(swapped, ref)[0] == "record 'arrays' is a MetricRecord, expected ArrayRecord"


def test_undecodable_array(ref):
    name = next(iter(ref.keys()))
    bad = ArrayRecord({k: a for k, a in ref.items()})
    bad[name] = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=b"garbage")
    reasons = check(reply_content(bad, unit_keys(2), good_metrics()), ref)
    assert len(reasons) == 1 and reasons[0].startswith(f"arrays: array '{name}' does not decode")


def test_batchnorm_running_stats_are_outside_the_update_norm():
    """An honest BN site moves running_var by its input scale, far past any step-size bound;
    the bound is on learned parameters. A negative variance is still refused."""
    import torch

    from clients.task import moco_config, shared_arrays
    from fedmoco.moco import MoCo
    from server_test_helpers import TINY

    torch.manual_seed(0)
    ref = shared_arrays(MoCo(moco_config({**TINY, "norm": "batch"})))
    stats = [n for n in ref.keys() if n.endswith("running_var")]
    assert stats, "a batch-norm model shares its running statistics"
    site = ArrayRecord({k: a for k, a in ref.items()})
    for name in stats:  # HU-scale inputs: variances in the thousands
        site[name] = Array(ref[name].numpy() + 4000.0)
    assert check(reply_content(site, unit_keys(2), good_metrics()), ref) == []
    lying = replace(site, stats[0], np.full_like(ref[stats[0]].numpy(), -1.0))
    assert check(reply_content(lying, unit_keys(2), good_metrics()), ref) == [
        f"arrays '{stats[0]}' has a negative variance"]
    means = [n for n in ref.keys() if n.endswith("running_mean")]
    huge = replace(site, means[0], np.full_like(ref[means[0]].numpy(), 3e38))
    assert check(reply_content(huge, unit_keys(2), good_metrics()), ref) == [
        f"arrays '{means[0]}' has |value| 3e+38 over 1e+08: no activation of normalised inputs comes near it"]
    # a real parameter step still counts
    n_params = sum(ref[k].numpy().size for k in ref.keys() if not k.endswith(("running_mean", "running_var")))
    assert "update norm" in check(reply_content(shifted(ref, 6.0 / np.sqrt(n_params)), unit_keys(2),
                                                good_metrics()), ref)[0]


def _declaring(values: np.ndarray, shape: tuple[int, ...]) -> Array:
    """An Array that holds ``values`` but declares ``shape``: Flower does not check one against the other."""
    honest = Array(values)
    return Array(dtype=honest.dtype, shape=shape, stype=honest.stype, data=honest.data)


def test_keys_are_judged_by_what_they_hold_not_what_they_declare(ref):
    # 5 real keys declared as none, with a release that accounts none: the old check read the
    # declared shape and let them into the global queue
    metrics = good_metrics(**{"dp-status": 4.0, "dp-keys-releases": 0.0, "dp-keys-epsilon": 0.0})
    content = RecordDict({"arrays": ref, "keys": ArrayRecord({"keys": _declaring(unit_keys(5), (0, 8))}),
                          "metrics": MetricRecord(metrics)})
    assert check(content, ref) == ["keys: array 'keys' declares shape (0, 8) of float32 but holds (5, 8) of float32"]
    # a declared shape of () used to crash the server's round
    scalar = RecordDict({"arrays": ref, "keys": ArrayRecord({"keys": _declaring(unit_keys(0), ())}),
                         "metrics": MetricRecord(good_metrics())})
    assert check(scalar, ref) == ["keys: array 'keys' declares shape () of float32 but holds (0, 8) of float32"]
    name = next(iter(ref.keys()))
    lying = ArrayRecord({k: a for k, a in ref.items()})
    lying[name] = _declaring(ref[name].numpy(), (1,))
    held = "(" + ", ".join(map(str, ref[name].shape)) + ")"
    assert check(reply_content(lying, unit_keys(2), good_metrics()), ref) == [
        f"arrays: array '{name}' declares shape (1,) of float32 but holds {held} of float32"]


def test_an_oversized_array_is_refused_before_it_is_decoded(ref):
    big = RecordDict({"arrays": ref, "keys": ArrayRecord({"keys": Array(unit_keys(4096))}),
                      "metrics": MetricRecord(good_metrics())})
    assert check(big, ref) == [f"keys: array 'keys' holds {4096 * 8 * 4 + 128} bytes, more than the 512 its values "
                               "may take"]
    extra = ArrayRecord({k: a for k, a in ref.items()})
    extra["stowaway"] = Array(np.zeros(100_000, np.float32))
    reasons = check(reply_content(extra, unit_keys(2), good_metrics()), ref)
    assert reasons == ["arrays: array 'stowaway' holds 400128 bytes, more than the 0 its values may take"]


def test_keys_under_a_status_that_releases_none_are_refused(ref):
    for status in (2, 3, 4, 5, 6, 7):
        reasons = check(reply_content(ref, unit_keys(3), good_metrics(**{"dp-status": float(status)})), ref)
        assert len(reasons) == 1 and reasons[0].startswith(f"keys: 3 keys sent under dp-status {status} ("), reasons
    assert check(reply_content(ref, unit_keys(3), good_metrics(**{"dp-status": 1.0})), ref) == []


@pytest.mark.parametrize("name,value,reason", [
    ("skipped", -1, "metrics 'skipped' is -1, expected >= 0"),
    ("seconds", -0.5, "metrics 'seconds' is -0.5, expected >= 0"),
    ("dp-keys-epsilon", -2.0, "metrics 'dp-keys-epsilon' is -2.0, expected >= 0"),
    ("dp-keys-releases", 1.5, "metrics 'dp-keys-releases' is 1.5, expected a whole number"),
    ("dp-keys-delta", 5.0, "metrics 'dp-keys-delta' is 5.0, expected a probability in [0, 1)"),
    ("dp-keys-budget", -8.0, "metrics 'dp-keys-budget' is -8.0, expected >= 0"),
    # a negative std raised a false collapse warning; a 300-digit time filled the round's log line
    ("emb-std", -5.0, "metrics 'emb-std' is -5.0, expected >= 0"),
    ("neg-var", -2.0, "metrics 'neg-var' is -2.0, expected >= 0"),
    ("train-loss", -1.0, "metrics 'train-loss' is -1.0, expected >= 0"),
    ("seconds", 1e300, "metrics 'seconds' is 1e+300, expected at most 1e+07"),
    # statistics beyond what cosine scores and InfoNCE can be skewed rounds.jsonl and the plots
    ("train-loss", 1.7e308, "metrics 'train-loss' is 1.7e+308, expected it in [0, 1e+06]"),
    ("pos-mean", -1e300, "metrics 'pos-mean' is -1e+300, expected it in [-1.01, 1.01]"),
    ("neg-mean", 1.5, "metrics 'neg-mean' is 1.5, expected it in [-1.01, 1.01]"),
    ("neg-var", 3.0, "metrics 'neg-var' is 3, expected it in [0, 1.01]"),
    ("emb-std", 2.0, "metrics 'emb-std' is 2, expected it in [0, 1.5]"),
    ("skipped", 2.5, "metrics 'skipped' is 2.5, expected a whole number"),
])
def test_counts_and_privacy_figures_cannot_be_negative_or_absurd(ref, name, value, reason):
    metrics = good_metrics(**{name: value})
    assert check(reply_content(ref, np.zeros((0, 8), np.float32), metrics), ref) == [reason]


def test_a_sites_free_text_reaches_the_log_as_one_short_printable_line():
    from server.validation import untrusted_text

    forged = "data unavailable\nround 3: accepted reply from hospital-b\x1b[2J" + "x" * 1000
    line = untrusted_text(forged)
    assert "\n" not in line and "\x1b" not in line and len(line) == 300 and line.endswith("…")
    assert line.startswith("data unavailable round 3: accepted reply from hospital-b [2J")
