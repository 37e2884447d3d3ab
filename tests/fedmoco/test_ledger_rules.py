"""The rules of a site's privacy ledger (fedmoco.ledger): what a delta may be, which recorded
releases are believed, and what a tightened budget reports as spent."""

from __future__ import annotations

import pytest

from fedmoco.errors import ConfigError
from fedmoco.ledger import SiteLedger, check_site_delta


def test_delta_of_exactly_one_over_the_image_count_is_refused():
    """delta must be strictly below 1 / n: at 1e-4 with 10,000 images one image may leak
    with probability 1 / n and still 'satisfy' the guarantee."""
    with pytest.raises(ConfigError, match=r"^node_config dp-delta: 0.0001 is too large for 10000 images; it must be "
                                          r"below one over the number of images"):
        check_site_delta(1e-4, 10_000)


def test_a_history_with_a_noise_no_release_could_have_is_refused():
    """A ledger file claiming z = 2e6 (calibration gives up below 1e6) is not believed:
    such a z would make the accountant report next to nothing spent."""
    with pytest.raises(ConfigError, match=r"^ledger: noise multiplier 2e\+06 is not one a release had "
                                          r"\(every release has one below 1e\+06\)"):
        SiteLedger("keys", 2.0, 1e-5, 3, [(2e6, 0.5, 1)])


def test_spent_after_a_tightened_delta_is_priced_at_the_new_delta():
    """After dp-delta is tightened the ledger reports epsilon at the NEW delta (here ~2.53,
    over the budget), not the plan's figure at the old one (~2.00)."""
    from fedmoco.privacy import KeyReleaseRDPAccountant

    ledger = SiteLedger("keys", 2.0, 1e-5, 3)
    for _ in range(3):
        ledger.record(ledger.next_noise(0.5), 0.5)
    at_old_delta = ledger.spent()
    ledger.tighten(2.0, 1e-7)
    accountant = KeyReleaseRDPAccountant()
    accountant.history = list(ledger.history)
    assert ledger.spent() == pytest.approx(accountant.get_epsilon(1e-7), rel=1e-9)
    assert ledger.spent() > at_old_delta  # a smaller delta costs more epsilon: ~2.5295 against ~1.9976


@pytest.mark.parametrize("field, value, message", [
    ("releases", 1.7, "releases is 1.7, expected a whole number"),
    ("planned_releases", 2.9, "planned_releases is 2.9, expected a whole number"),
    ("epsilon_budget", True, "epsilon_budget is True, expected a number"),
    ("epsilon_budget", "2", "epsilon_budget is '2', expected a number"),
])
def test_a_ledger_field_in_another_form_than_the_ledger_writes_is_refused(field, value, message):
    """1.7 releases read as 1 (an under-count), a budget of `true` as 1.0 (found by an audit)."""
    ledger = SiteLedger("prototypes", 2.0, 1e-5, 5)
    ledger.record(3.0, 1.0)
    state = ledger.state_dict()
    assert SiteLedger.from_state_dict(state).spent() == ledger.spent()  # as written, it reads back
    if field == "releases":
        state["history"][0]["releases"] = value
    else:
        state[field] = value
    with pytest.raises(ConfigError, match=f"ledger: malformed \\(TypeError: {message}\\)"):
        SiteLedger.from_state_dict(state)


def test_a_budget_that_cannot_be_reached_says_why_in_the_sites_log(caplog):
    """dp-epsilon 0.001 at delta 1e-5 plans no release (the conversion's floor at order 1024 is
    ~0.0045); the site saw only "budget exhausted" (found by an audit). Its log now carries the
    calibration's reason."""
    import logging

    ledger = SiteLedger("prototypes", 0.001, 1e-5, 10)
    with caplog.at_level(logging.WARNING, logger="fedmoco.ledger"):
        assert ledger.next_noise(1.0, 2.0) is None
    assert ("privacy budget: no release can be planned: epsilon: 0.001 cannot be reached with delta=1e-05 for 10 "
            "prototype release(s); raise epsilon or delta") in caplog.text


@pytest.mark.parametrize("epsilon", [0.05, 0.1])
def test_a_small_prototype_budget_plans_releases_that_spend_it(epsilon):
    """Below ~0.19 at delta 1e-5 the prototype accountant's orders (2-63) could not reach any
    epsilon, so a careful site was told its budget was exhausted before its first release. With
    orders up to 1024 it plans all 10, and Opacus' stock accountant given the same orders prices
    the plan at 0.9-1.0 of the budget."""
    from opacus.accountants import RDPAccountant

    from fedmoco.privacy import ALPHAS

    ledger = SiteLedger("prototypes", epsilon, 1e-5, 10)
    first = ledger.next_noise(1.0, 2.0)
    assert first is not None
    rest = ledger.plan["noise"][1]
    assert len(ledger.plan["noise"]) == 10 and rest == pytest.approx(first * 2**0.5, rel=1e-3)
    stock = RDPAccountant()
    stock.history = [(first, 1.0, 1), (rest, 1.0, 9)]
    assert 0.9 * epsilon <= stock.get_epsilon(1e-5, alphas=ALPHAS) <= epsilon
