"""``fedrec privacy-audit``: held-out users and canaries, and attacks that can fail."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.config import parse_config
from fedrec.data import prepare_split
from fedrec.data.membership import MembershipConfig, canary_users, held_out, plant_canaries
from fedrec.experiment import run_centralized
from fedrec.population import population_of
from fedrec.privacy import PrivacyEvent, PrivacyLedger
from fedrec.privacy.report import write_privacy_report

AUDITED = {
    "seed": 0,
    "data": {
        "source": "synthetic",
        "synthetic": {"num_users": 200, "num_items": 400, "mean_length": 30, "seed": 0},
    },
    "model": {"name": "hstu", "max_len": 30, "embedding_dim": 32, "num_blocks": 1, "dropout": 0.0},
    "train": {"epochs": 40, "eval_every": 40, "patience": 1, "progress": False},
    "evaluation": {"ks": [10]},
    "privacy_audit": {"holdout_fraction": 0.5, "canaries": 4},
}


def test_held_out_users_have_no_client_and_canaries_replace_member_histories():
    config = parse_config(AUDITED)
    population = population_of(config)
    outside = held_out(population.split.num_users, config.privacy_audit, config.seed)
    trained = np.concatenate(population.partitions)
    assert 0.35 < outside.mean() < 0.65 and not outside[trained].any()
    assert len(trained) == (~outside).sum()
    _, plain = prepare_split(config.data)
    for user in canary_users(plain.num_users, config.privacy_audit, config.seed):
        assert not outside[user]
        planted, original = population.split.full(user)[0], plain.full(user)[0]
        assert not np.array_equal(planted[:-2], original[:-2])  # the training part is the canary
        assert np.array_equal(planted[-2:], original[-2:])  # held-out items stay real
    untouched = plant_canaries(plain, MembershipConfig(holdout_fraction=0.5), 0)
    assert untouched is plain


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("central")
    run_centralized(parse_config(AUDITED), run_dir)
    return run_dir


def test_the_attack_detects_membership_of_a_non_private_model(overfit_run):
    """It must be able to fail: an overfit model leaks membership and its canaries."""
    out = CliRunner().invoke(app, ["privacy-audit", str(overfit_run), "--references", "200"])
    assert out.exit_code == 0, out.output
    report = json.loads((overfit_run / "privacy_audit.json").read_text())
    membership = report["membership"]
    assert membership["auc"] > 0.75 and membership["p_value"] < 0.01
    assert membership["auc_interval"][0] > 0.6
    assert report["claimed"]["epsilon"] == float("inf") and not membership["bound"]["contradicts"]
    assert report["canaries"]["exposure_median"] > 4  # far above a random sequence's ~1 bit
    assert "AUC" in out.output


def test_a_false_privacy_claim_is_caught(overfit_run):
    """A report claiming user-level ε ≈ 0.1 for that same model is contradicted, and the
    privacy report shows the audit."""
    ledger = PrivacyLedger()
    ledger.record(PrivacyEvent(1, "server", "dp-fedavg", "user", 40.0, 1.0, 1, 1.0, 1e-5))
    write_privacy_report(ledger, overfit_run, {"not_covered": []})
    claimed = ledger.epsilon("server", 1e-5)
    assert claimed < 0.2
    try:
        out = CliRunner().invoke(app, ["privacy-audit", str(overfit_run), "--references", "50"])
        page = (overfit_run / "privacy.html").read_text()
    finally:
        (overfit_run / "privacy.json").unlink()
    assert out.exit_code == 0, out.output
    report = json.loads((overfit_run / "privacy_audit.json").read_text())
    assert report["claimed"]["epsilon"] == pytest.approx(claimed)
    assert report["membership"]["bound"]["contradicts"], out.output
    assert report["membership"]["bound"]["empirical_epsilon_lower"] > claimed
    assert "Empirical privacy audit" in page and "class=warn" in page


def test_a_run_without_held_out_users_is_refused_with_the_fix(tmp_path):
    config = parse_config(
        {**AUDITED, "privacy_audit": {}, "train": {**AUDITED["train"], "epochs": 1}}
    )
    run_centralized(config, tmp_path)
    out = CliRunner().invoke(app, ["privacy-audit", str(tmp_path)])
    assert out.exit_code != 0 and "holdout_fraction" in out.output
