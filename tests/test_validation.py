"""One hostile client among five cannot take over, break or stop a round (issue 14)."""

from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedrec.federation import CentralDPConfig, FederatedConfig
from fedrec.federation.privacy import dp_statement_problem
from fedrec.privacy.dp_sgd import DPSGDConfig, plan_dp
from server.strategy import LedgerKeeper, build_strategy
from server.validation import ReplyValidator
from simulations.inprocess import InProcessGrid

from .conftest import reply

GLOBAL = {"w": np.zeros((4, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def _stack(fed: FederatedConfig) -> ReplyValidator:
    """As ``server.rounds.run_federation`` builds it."""
    inner = build_strategy(fed, 5, seed=0)
    return ReplyValidator(
        LedgerKeeper(inner, lambda *_: None),
        weighted=fed.weighted,
        check_norm=fed.central_dp is None,
    )


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in values.items()})


def _round(fed: FederatedConfig, hostile) -> tuple[dict[str, np.ndarray], int]:
    """Four honest clients (small updates, weight 10) and one ``hostile(message)`` reply."""
    strategy = _stack(fed)
    rng = np.random.default_rng(0)
    instructions = sorted(
        strategy.configure_train(1, _arrays(GLOBAL), ConfigRecord(), InProcessGrid(5)),
        key=lambda m: m.metadata.dst_node_id,
    )
    assert len(instructions) == 5
    replies = []
    for i, message in enumerate(instructions):
        if i == 0:
            replies.append(hostile(message))
            continue
        update = {
            k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in GLOBAL.items()
        }
        replies.append(reply(message, _arrays(update), 10))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    return {k: v.numpy() for k, v in arrays.items()}, int(metrics["rejected"])


def _honest_only(fed: FederatedConfig) -> dict[str, np.ndarray]:
    return _round(fed, lambda m: reply(m, _arrays(GLOBAL), 0))[0]  # a refusal: left out


def _with(values: dict[str, np.ndarray], weight: int = 10):
    return lambda m: reply(m, _arrays(values), weight)


def _scaled(factor: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, factor * 0.01) for k, v in GLOBAL.items()}


ATTACKS = {
    "nan": _with({**GLOBAL, "w": np.full((4, 3), np.nan, dtype=np.float32)}),
    "inf": _with({**GLOBAL, "b": np.array([np.inf, 0, 0], dtype=np.float32)}),
    "wrong shape": _with({**GLOBAL, "w": np.zeros((3, 4), dtype=np.float32)}),
    "extra key": _with({**GLOBAL, "backdoor": np.ones(2, dtype=np.float32)}),
    "missing key": _with({"w": GLOBAL["w"]}),
    "integer arrays": _with({k: v.astype(np.int64) for k, v in GLOBAL.items()}),
    "scaled x1000": _with(_scaled(1000.0)),
    "random weights, weight 1e9": _with(
        {
            k: np.random.default_rng(1).normal(0, 1, v.shape).astype(np.float32)
            for k, v in GLOBAL.items()
        },
        weight=10**9,
    ),
    "negative weight": _with(_scaled(1.0), weight=-5),
    "metrics not numbers": lambda m: _bad_metrics(m),
    "bytes that are not an array": lambda m: _forged(m, b"garbage"),
    "a header claiming 10^10 values": lambda m: _forged(m, _huge_header()),
    "an extra metric": lambda m: _extra_metric(m),
}


def _forged(message, data: bytes):
    out = reply(message, _arrays(_scaled(1.0)), 10)
    arrays = dict(out.content["arrays"].items())
    arrays["w"] = Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray", data=data)
    out.content["arrays"] = ArrayRecord(arrays)
    return out


def _huge_header() -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**10,)}
    )
    return header.getvalue() + bytes(48)


def _extra_metric(message):
    out = reply(message, _arrays(_scaled(1.0)), 10)
    out.content["metrics"] = MetricRecord({"num-examples": 10, "steer": 1e6})
    return out


def _bad_metrics(message):
    out = reply(message, _arrays(_scaled(1.0)), 10)
    out.content["metrics"] = MetricRecord({"num-examples": 10, "train-loss": float("nan")})
    return out


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_hostile_reply_is_rejected_and_the_round_goes_on(attack):
    fed = FederatedConfig(clients_per_round=5)  # FedAvg, weighted by examples, no DP
    model, rejected = _round(fed, ATTACKS[attack])
    assert rejected == 1
    clean = _honest_only(fed)
    for key in GLOBAL:
        np.testing.assert_allclose(model[key], clean[key], atol=1e-7)


def test_a_huge_weight_with_a_small_update_is_capped_by_the_server():
    """Within the norm bound, num-examples 10⁹ would make the mean the attacker's; the server
    caps it at 10× the round's median weight."""
    fed = FederatedConfig(clients_per_round=5)
    model, rejected = _round(fed, _with(_scaled(3.0), weight=10**9))
    assert rejected == 0
    attacker = 0.03  # every coordinate of its update
    share = float(np.mean(model["w"])) / attacker  # the honest updates average ≈ 0
    assert share == pytest.approx(100 / 140, abs=0.05)  # weight 100 (capped) against 4 × 10


def test_under_dp_weights_are_ones_and_an_unclipped_update_counts_as_c():
    fed = FederatedConfig(
        clients_per_round=5,
        central_dp=CentralDPConfig(noise_multiplier=0.0, clipping_norm=0.1, sampling="fixed"),
    )
    model, rejected = _round(fed, _with(_scaled(1000.0), weight=10**9))
    assert rejected == 0  # the DP wrapper clips it to C itself
    honest = _honest_only(fed)
    moved = np.sqrt(sum(np.sum((model[k] - honest[k]) ** 2) for k in GLOBAL))
    assert moved <= 0.1 / 5 + 1e-6  # at most C / cohort: one client's clipped share


SIGNAL = 0.01  # what every honest client's update agrees on


def _agreeing_round(fed: FederatedConfig, flip: bool) -> dict[str, np.ndarray]:
    """Four honest clients move every weight by ≈ SIGNAL; with ``flip`` the fifth sends −5×
    that (its norm is 5× an honest one's: inside the validator's bound)."""
    strategy = _stack(fed)
    rng = np.random.default_rng(0)
    instructions = sorted(
        strategy.configure_train(1, _arrays(GLOBAL), ConfigRecord(), InProcessGrid(5)),
        key=lambda m: m.metadata.dst_node_id,
    )
    replies = []
    for i, message in enumerate(instructions):
        scale = -5.0 if (i == 0 and flip) else 1.0
        update = {
            k: (v + scale * SIGNAL + rng.normal(0, SIGNAL / 10, v.shape)).astype(np.float32)
            for k, v in GLOBAL.items()
        }
        replies.append(reply(message, _arrays(update), 10))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and metrics["rejected"] == 0
    return {k: v.numpy() for k, v in arrays.items()}


def _off_signal(model: dict[str, np.ndarray]) -> float:
    return float(max(np.abs(model[k] - SIGNAL).max() for k in GLOBAL))


@pytest.mark.parametrize("rule", ["krum", "multikrum", "trimmedmean", "median"])
def test_a_robust_rule_resists_what_validation_lets_through(rule):
    plain = FederatedConfig(clients_per_round=5)
    robust = FederatedConfig(clients_per_round=5, strategy=rule, malicious_clients=1, krum_select=3)
    assert _off_signal(_agreeing_round(plain, flip=False)) < SIGNAL / 5
    assert _off_signal(_agreeing_round(plain, flip=True)) > SIGNAL  # FedAvg is dragged past 0
    assert _off_signal(_agreeing_round(robust, flip=True)) < SIGNAL / 2


def test_robust_aggregation_and_user_level_dp_do_not_compose():
    with pytest.raises(ValueError, match="receives only their noised mean"):
        FederatedConfig(strategy="krum", central_dp=CentralDPConfig())


HONEST = {  # 10 records in batches of 5: q = 1/2, one local epoch = 2 steps
    "dp-noise-multiplier": 1.0,
    "dp-clip-norm": 1.0,
    "dp-delta": 1e-5,
    "dp-sample-rate": 0.5,
    "dp-steps": 2,
}


def _rejected_statements(fed: FederatedConfig, statements: list[dict]) -> int:
    strategy = ReplyValidator(
        LedgerKeeper(build_strategy(fed, 5, seed=0), lambda *_: None),
        weighted=fed.weighted,
        check_norm=True,
        statement_problem=functools.partial(dp_statement_problem, fed),
    )
    instructions = list(
        strategy.configure_train(1, _arrays(GLOBAL), ConfigRecord(), InProcessGrid(5))
    )
    replies = []
    for message, stated in zip(instructions, statements, strict=True):
        out = reply(message, _arrays(_scaled(1.0)), 1)
        out.content["metrics"] = MetricRecord({"num-examples": 1, **stated})
        replies.append(out)
    _, facts = strategy.aggregate_train(1, replies)
    assert facts is not None
    return int(facts["rejected"])


@pytest.mark.parametrize(
    ("lie", "value"),
    [
        ("dp-noise-multiplier", 50.0),  # claims far more noise: its ε would look tiny
        ("dp-clip-norm", 0.001),
        ("dp-delta", 0.5),
        ("dp-sample-rate", 1.5),
        ("dp-sample-rate", 0.3),  # not 1 / a whole number of batches
        ("dp-steps", -3),
        ("dp-steps", 1),  # fewer steps than one epoch of its batches: a smaller ε
    ],
)
def test_a_reply_that_misstates_its_dp_release_is_rejected(lie, value):
    fed = FederatedConfig(
        clients_per_round=5, record_dp=DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    )
    assert _rejected_statements(fed, [HONEST] * 5) == 0
    assert _rejected_statements(fed, [{**HONEST, lie: value}] + [HONEST] * 4) == 1


def test_under_a_target_epsilon_sigma_must_be_the_one_solved_for_the_stated_rate():
    """σ is solved by each client for its q; the server solves it again and believes nothing
    else (a client stating σ 5 where 1.4 was solved would report a fraction of its ε)."""
    record_dp = DPSGDConfig(target_epsilon=4.0, max_grad_norm=1.0)
    fed = FederatedConfig(clients_per_round=5, num_rounds=3, record_dp=record_dp)
    solved = plan_dp(10, dataclasses.replace(record_dp, batch_size=5), 1, 3).noise_multiplier
    honest = {**HONEST, "dp-noise-multiplier": solved}
    assert _rejected_statements(fed, [honest] * 5) == 0
    lying = {**honest, "dp-noise-multiplier": solved * 3}
    assert _rejected_statements(fed, [lying] + [honest] * 4) == 1
