"""The privacy ledger against fresh Opacus accountants and the analytic Gaussian mechanism."""

import json
import math

import dp_accounting
import pytest
from dp_accounting import rdp
from opacus.accountants import PRVAccountant, RDPAccountant

from fedrec.privacy import PrivacyBudget, PrivacyEvent, PrivacyLedger, epsilon
from fedrec.privacy.accounting import WITHOUT_REPLACEMENT_ACCOUNTANT


def event(
    round_,
    party="client:0",
    sigma=1.0,
    q=0.01,
    steps=10,
    unit="user-day",
    mechanism="dp-sgd",
    accountant="rdp",
):
    return PrivacyEvent(
        round_,
        party,
        mechanism,
        unit,
        sigma,
        q,
        steps,
        clip_norm=1.0,
        delta=1e-5,
        accountant=accountant,
    )


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε of one Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Thm. 8)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731

    def delta_of(eps):
        return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(
            -1 / (2 * sigma) - eps * sigma
        )

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_epsilon_equals_a_fresh_opacus_accountant(accountant):
    ledger = PrivacyLedger()
    fresh = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for round_ in range(1, 6):
        sigma, q = (1.1, 0.02) if round_ < 4 else (0.9, 0.05)
        ledger.record(event(round_, sigma=sigma, q=q, steps=7, accountant=accountant))
        ledger.record(event(round_, party="client:1", sigma=2.0, q=0.5, steps=1))
        for _ in range(7):
            fresh.step(noise_multiplier=sigma, sample_rate=q)
        assert ledger.epsilon("client:0", 1e-5) == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-9)
    assert ledger.parties() == ["client:0", "client:1"]
    assert ledger.history("client:0") == [(1.1, 0.02, 21), (0.9, 0.05, 14)]


@pytest.mark.parametrize("sigma", [0.8, 2.0, 5.0])
def test_full_batch_gaussian_matches_the_analytic_value(sigma):
    """q = 1 and T steps compose to one Gaussian mechanism with σ/√T, whose ε is known exactly."""
    steps, delta = 4, 1e-5
    exact = analytic_gaussian_epsilon(sigma / math.sqrt(steps), delta)
    assert epsilon([(sigma, 1.0, steps)], delta, "prv") == pytest.approx(exact, rel=0.02)
    rdp = epsilon([(sigma, 1.0, steps)], delta, "rdp")
    assert exact <= rdp <= 1.3 * exact  # RDP is an upper bound, and not a loose one here


def test_epsilon_grows_with_rounds_and_never_resets_through_state_dict():
    ledger = PrivacyLedger()
    for round_ in range(1, 4):
        ledger.record(event(round_))
    by_round = ledger.epsilon_by_round("client:0", 1e-5)
    assert list(by_round) == [1, 2, 3] and by_round[1] < by_round[2] < by_round[3]
    resumed = PrivacyLedger()
    resumed.load_state_dict(ledger.state_dict())
    resumed.record(event(4))
    assert resumed.epsilon("client:0", 1e-5) > by_round[3]
    assert resumed.events[:3] == ledger.events


def test_noiseless_release_has_infinite_epsilon_and_nothing_has_zero():
    assert epsilon([], 1e-5) == 0.0
    assert math.isinf(epsilon([(0.0, 0.1, 1)], 1e-5))


def test_budget_refuses_the_release_that_would_exceed_it():
    ledger = PrivacyLedger()
    budget = PrivacyBudget(target_epsilon=8.0, delta=1e-5)
    released = 0
    for round_ in range(1, 100):
        next_event = event(round_, sigma=1.0, q=0.1, steps=20)
        if not budget.allows(ledger, next_event):
            break
        ledger.record(next_event)
        released += 1
    assert 0 < released < 99
    assert ledger.epsilon("client:0", 1e-5) <= 8.0
    assert ledger.epsilon("client:0", 1e-5, extra=event(0, sigma=1.0, q=0.1, steps=20)) > 8.0


def test_invalid_events_and_mismatched_checkpoints_are_rejected():
    with pytest.raises(ValueError, match="unit"):
        event(1, unit="household")
    with pytest.raises(ValueError, match="sample_rate"):
        event(1, q=0.0)
    ledger = PrivacyLedger()
    ledger.record(event(1, accountant="rdp"))
    ledger.record(event(2, accountant="prv"))  # e.g. a device ledger older than a config change
    # Two accountants' compositions do not add: basic composition, each at half of δ.
    assert ledger.epsilon("client:0", 1e-5) == pytest.approx(
        epsilon([(1.0, 0.01, 10)], 5e-6, "rdp") + epsilon([(1.0, 0.01, 10)], 5e-6, "prv")
    )
    with pytest.raises(ValueError, match="without replacement"):
        event(1, accountant=WITHOUT_REPLACEMENT_ACCOUNTANT)  # a Poisson event
    with pytest.raises(ValueError, match="population"):
        PrivacyEvent(
            1,
            "server",
            "dp-fedavg",
            "user",
            1.0,
            0.1,
            1,
            1.0,
            1e-5,
            sampling="without-replacement",
            accountant=WITHOUT_REPLACEMENT_ACCOUNTANT,
        )


@pytest.mark.parametrize("sigma, cohort, population", [(0.8, 100, 1000), (2.0, 50, 5000)])
def test_fixed_cohorts_are_accounted_by_a_fresh_dp_accounting_replace_one_accountant(
    sigma, cohort, population
):
    ledger = PrivacyLedger()
    for round_ in range(1, 31):
        ledger.record(
            PrivacyEvent(
                round_,
                "server",
                "dp-fedavg",
                "user",
                sigma,
                cohort / population,
                1,
                1.0,
                1e-5,
                sampling="without-replacement",
                population=population,
                accountant=WITHOUT_REPLACEMENT_ACCOUNTANT,
            )
        )
    fresh = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    fresh.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(
            population, cohort, dp_accounting.GaussianDpEvent(sigma)
        ),
        30,
    )
    assert ledger.epsilon("server", 1e-5) == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-9)
    # Replace-one with sampling without replacement costs more than add/remove with Poisson.
    poisson = epsilon([(sigma, cohort / population, 30)], 1e-5)
    assert ledger.epsilon("server", 1e-5) > poisson


def test_version_1_ledgers_load_with_their_accountant_and_an_honest_unit():
    old = {
        "accountant": "prv",
        "events": [
            {
                "round": 1,
                "party": "client:0",
                "mechanism": "dp-sgd",
                "unit": "event",
                "noise_multiplier": 1.0,
                "sample_rate": 0.5,
                "steps": 2,
                "clip_norm": 1.0,
                "delta": 0.02,
                "note": "",
            }
        ],
    }
    ledger = PrivacyLedger()
    ledger.load_state_dict(old)
    assert ledger.events[0].accountant == "prv" and ledger.events[0].unit == "window"
    resumed = PrivacyLedger()
    resumed.load_state_dict(ledger.state_dict())
    assert resumed.events == ledger.events


def test_the_report_opens_with_each_guarantee_and_plots_cumulative_epsilon(tmp_path):
    from fedrec.privacy.report import write_privacy_report

    ledger = PrivacyLedger()
    ledger.record(event(1, party="client:0", sigma=1.0, q=0.5, steps=4))
    ledger.record(event(3, party="client:1", sigma=2.0, q=0.5, steps=2))  # client 0 sits out
    for round_ in (1, 2, 3):
        ledger.record(
            event(
                round_,
                party="server",
                sigma=1.0,
                q=0.1,
                steps=1,
                unit="user",
                mechanism="dp-fedavg",
            )
        )
    disclosures = {
        "budgets": {"client_epsilon": 20.0, "federation_epsilon": None},
        "refused_client_rounds": 2,
        "reproducible_noise": False,
        "not_covered": ["Clients send their training loss un-noised."],
    }
    json_path, html_path = write_privacy_report(ledger, tmp_path, disclosures)
    summary = json.loads(json_path.read_text())
    levels = [g["level"] for g in summary["guarantees"]]
    assert levels == ["user-level (DP-FedAvg)", "record-level (DP-SGD on each device)"]
    user, record = summary["guarantees"]
    assert user["epsilon"] == pytest.approx(ledger.epsilon("server", 1e-5))
    assert "Not the server" in user["protected_from"] and "Poisson" in user["sampling"]
    assert record["epsilon"] == pytest.approx(ledger.epsilon("client:0", 1e-5))
    # The running max keeps client 0's ε in round 2, when it released nothing.
    cumulative = summary["clients"]["cumulative_by_round"]
    assert cumulative["rounds"] == [1, 2, 3]
    assert cumulative["max"][1] == cumulative["max"][0] == pytest.approx(record["epsilon"])
    page = html_path.read_text()
    assert page.index("protected from") < page.index("<img")  # the headline comes first
    assert "δ = 1.0e-5" in page and "0.0333" not in page
    assert "training loss un-noised" in page and "2 client-rounds refused" in page
