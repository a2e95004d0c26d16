"""Adaptive clipping for user-level DP (Andrew et al. 2021): the norm follows a quantile of the
update norms, the count it learns from is a DP release, and together they cost the ε of the
configured σ, which is what the ledger books."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedrec.config import parse_config
from fedrec.errors import FedrecConfigError
from fedrec.federation.config import AdaptiveClippingConfig, CentralDPConfig
from fedrec.population import population_of
from server.dp import UserLevelDP, noise_split
from server.sampling import round_generator
from server.strategy import build_strategy, load_strategy_state, strategy_state
from simulations.inprocess import run_inprocess

ADAPTIVE = {"target_quantile": 0.5, "learning_rate": 0.2}


def _central(**extra) -> dict:
    return {"noise_multiplier": 1.0, "clipping_norm": 0.5, **extra}


def _config(tmp_path, central: dict, **federated) -> dict:
    return {
        "seed": 0,
        "output_dir": str(tmp_path),
        "data": {
            "source": "synthetic",
            "synthetic": {"num_users": 80, "num_items": 40, "mean_length": 12, "seed": 0},
        },
        "model": {"name": "hstu", "max_len": 10, "embedding_dim": 8, "num_blocks": 1},
        "audit": {"enabled": False},
        "federated": {
            "num_rounds": 4,
            "clients_per_round": 40,
            "central_dp": central,
            "reproducible_noise": True,
            **federated,
        },
    }


def test_the_noise_is_split_so_both_releases_cost_the_configured_sigma():
    central = CentralDPConfig(**_central(adaptive_clipping=AdaptiveClippingConfig(**ADAPTIVE)))
    count, update = noise_split(central, 40)  # σ_b defaults to cohort / 20 = 2
    assert count == 2.0
    assert update == pytest.approx((1.0**-2 - (2 * 2.0) ** -2) ** -0.5)
    # RDP of the pair at order α: α/(2σ_Δ²) + α(½)²/(2σ_b²) = α/(2σ²)
    assert update**-2 + (2 * count) ** -2 == pytest.approx(1.0)
    assert noise_split(CentralDPConfig(**_central()), 40) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("central", "federated", "message"),
    [
        (_central(adaptive_clipping=ADAPTIVE, sampling="fixed"), {}, "Poisson sampling"),
        (_central(adaptive_clipping={"count_stddev": 0.4}), {}, "count_stddev above 0.5"),
        (_central(adaptive_clipping={"target_quantile": 1.0}), {}, "target_quantile in"),
        (
            _central(adaptive_clipping=ADAPTIVE),
            {"secure_aggregation": {"min_contributors": 3}},
            "SecAgg",
        ),
    ],
)
def test_settings_that_break_it_are_refused_at_load(tmp_path, central, federated, message):
    with pytest.raises(FedrecConfigError, match=message):
        parse_config(_config(tmp_path, central, **federated), "adaptive.yaml")


def _dp(cohort: int, count_stddev: float, clip: float = 1.0) -> UserLevelDP:
    central = CentralDPConfig(
        **_central(clipping_norm=clip, adaptive_clipping=AdaptiveClippingConfig(**ADAPTIVE))
    )
    return UserLevelDP(
        object(),  # type: ignore[arg-type]  # the wrapped strategy is not used here
        noise_multiplier=1.0,
        clipping_norm=clip,
        cohort=cohort,
        population=10 * cohort,
        sampling="poisson",
        generator=round_generator(0),
        adaptive=central.adaptive_clipping,
        count_stddev=count_stddev,
    )


def test_the_norm_converges_to_the_target_quantile_of_the_update_norms():
    dp = _dp(cohort=100, count_stddev=1.0, clip=0.1)
    dp.rng = np.random.default_rng(0)
    norms = np.random.default_rng(1)
    for _ in range(300):
        round_norms = norms.uniform(0.0, 10.0, 100)  # median 5
        dp.adapt_clipping_norm((round_norms <= dp.clipping_norm).tolist())
    assert dp.clipping_norm == pytest.approx(5.0, abs=0.6)


def test_the_count_is_centred_and_divided_by_the_expected_cohort():
    """Under Poisson sampling the number of replies is private: the count's sensitivity is ½
    only as Σ(bᵢ − ½) over the public expected cohort (Flower divides by the replies)."""
    dp = _dp(cohort=100, count_stddev=1e-12)
    fraction = dp.adapt_clipping_norm([True] * 40 + [False] * 20)  # 60 replied of 100 expected
    assert fraction == pytest.approx((40 - 30) / 100 + 0.5)
    assert dp.clipping_norm == pytest.approx(math.exp(-0.2 * (0.6 - 0.5)))


def test_the_update_noise_is_the_splits_sigma_times_the_current_norm():
    dp = _dp(cohort=10, count_stddev=2.0, clip=0.25)
    dp.current, dp.rng = [np.zeros(200_000, dtype=np.float32)], np.random.default_rng(0)
    noised = dp.noised_mean([np.zeros(200_000)])[0]
    assert float(noised.std()) == pytest.approx(1.0 * 0.25 / 10, rel=0.02)


def test_a_run_adapts_the_norm_books_the_configured_epsilon_and_keeps_the_norm_on_resume(
    tmp_path,
):
    runs = {}
    for name, central in (
        ("fixed", _central()),
        ("adaptive", _central(adaptive_clipping={"learning_rate": 1.0, "target_quantile": 0.9})),
    ):
        config = parse_config(_config(tmp_path / name, central), name)
        run_inprocess(population_of(config), tmp_path / name, progress=False)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
    fixed, adaptive = runs["fixed"], runs["adaptive"]
    norms = [r["train"]["clipping-norm"] for r in adaptive if "train" in r]
    assert norms[0] == 0.5 and len(set(norms)) == len(norms)  # it moved every round
    assert {r["train"]["clipping-norm"] for r in fixed if "train" in r} == {0.5}
    # the same σ, the same ε: the count's noise is paid for by the update's
    assert [r["epsilon"] for r in adaptive] == [r["epsilon"] for r in fixed]
    # the norm is part of the checkpointed state
    config = parse_config(_config(tmp_path / "adaptive", _central(adaptive_clipping=ADAPTIVE)), "x")
    strategy = build_strategy(config.federated, 80, 0)
    saved = strategy_state(strategy)
    assert any(s.get("clipping_norm") == 0.5 for s in saved)
    for state in saved:
        if "clipping_norm" in state:
            state["clipping_norm"] = 0.123
    load_strategy_state(strategy, saved)
    assert isinstance(strategy, UserLevelDP) and strategy.clipping_norm == 0.123


def _reply(state: dict[str, np.ndarray], metrics: dict):  # type: ignore[no-untyped-def]
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.federation.arrays import state_record

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 0
    content = RecordDict({"arrays": state_record(state), "metrics": MetricRecord(metrics)})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_the_count_is_of_the_clients_bits_before_their_clip_not_of_the_clipped_updates():
    """Clients clip before they reply, so every update the server sees is within C: the bit
    must be the client's own (``norm-bit``, the norm before its clip). Counting the clipped
    updates instead drove C down every round whatever the norms were."""
    import torch

    from fedrec.federation.client import clip_update

    clip = 0.1
    dp = _dp(cohort=40, count_stddev=1e-12, clip=clip)
    dp.keys, dp.current = ["w"], [np.zeros(50, dtype=np.float32)]
    dp.strategy = type("Echo", (), {"aggregate_train": lambda _s, _r, replies: (None, None)})()
    big = {"w": torch.full((50,), 1.0)}  # norm ≈ 7.07: ten times as much would not fit either
    state, norm = clip_update(big, {"w": torch.zeros(50)}, clip)
    assert norm == pytest.approx(math.sqrt(50)) and float(state["w"].norm()) == pytest.approx(clip)
    clipped = {"w": state["w"].numpy()}
    replies = [_reply(clipped, {"num-examples": 1, "norm-bit": 0}) for _ in range(40)]
    _, metrics = dp.aggregate_train(1, replies)
    assert metrics is not None and metrics["within-clip-fraction"] == pytest.approx(0.0, abs=1e-9)
    assert dp.clipping_norm > clip  # none within C: it grows
    replies = [_reply(clipped, {"num-examples": 1, "norm-bit": 1}) for _ in range(40)]
    before = dp.clipping_norm
    dp.aggregate_train(2, replies)
    assert dp.clipping_norm < before  # all within: it shrinks
