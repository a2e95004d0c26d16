"""DP noise that the server cannot regenerate, user-level noise before the server optimizer, and
ε for the client sampling actually run."""

from __future__ import annotations

import dataclasses

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from fedrec.federation import (
    CentralDPConfig,
    FederatedConfig,
    central_event,
    local_train,
    noise_seed,
)
from fedrec.models import build_model, model_config
from fedrec.privacy import PrivacyLedger
from fedrec.privacy.dp_sgd import DPSGDConfig
from server.dp import UserLevelDP
from server.sampling import round_generator
from server.strategy import build_strategy
from simulations.inprocess import InProcessGrid

from .conftest import reply as _reply


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _client_run(split, fed: FederatedConfig, seed: int | None, sigma: float) -> torch.Tensor:
    """One client's round from the same initial model; ``seed`` = the noise seed used."""
    torch.manual_seed(0)
    model = build_model(
        "sasrec", split.num_items, model_config("sasrec", {"max_len": 10, "embedding_dim": 8})
    )
    record_dp = dataclasses.replace(fed.record_dp, noise_multiplier=sigma)
    local_train(model, split, dataclasses.replace(fed, record_dp=record_dp), 7, seed)
    return _flat(model)


@pytest.fixture
def dp_client(small_split):
    fed = FederatedConfig(
        local_epochs=1,
        local_optimizer="sgd",
        local_learning_rate=0.5,
        record_window=5,
        record_period=10**12,  # one record per user: q = 1, a single step
        record_dp=DPSGDConfig(noise_multiplier=1.0, batch_size=64, max_grad_norm=1.0),
    )
    return small_split.subset(np.arange(6)), fed


def test_client_noise_cannot_be_replayed_from_the_config_seed(dp_client):
    """The audit's noise-replay attack. The server knows the config (seed 0), so it can run the
    client's round itself with the seed the reproducible mode would use and subtract the noise.
    By default that replay recovers nothing; in the explicit reproducible mode it recovers the
    noise exactly, which is why that mode is flagged in the privacy report."""
    split, fed = dp_client
    noiseless = _client_run(split, fed, None, 0.0)
    replay_seed = noise_seed(dataclasses.replace(fed, reproducible_noise=True), 0, 3, 1)
    replayed_noise = _client_run(split, fed, replay_seed, 1.0) - noiseless

    private = _client_run(split, fed, noise_seed(fed, 0, 3, 1), 1.0)  # the default: no seed
    again = _client_run(split, fed, noise_seed(fed, 0, 3, 1), 1.0)
    noise = private - noiseless
    assert noise.norm() > 0.1 and (private - again).norm() > 0.5 * noise.norm()
    # Subtracting the replayed noise leaves the model further from the noiseless one (√2×
    # for independent noise), not on it.
    assert (private - replayed_noise - noiseless).norm() > 1.2 * noise.norm()

    reproducible = dataclasses.replace(fed, reproducible_noise=True)
    seeded = _client_run(split, fed, noise_seed(reproducible, 0, 3, 1), 1.0)
    assert (seeded - replayed_noise - noiseless).abs().max() < 1e-6  # replay works when seeded


def _arrays(value: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"w": Array(value.astype(np.float32))})


def _round(strategy, grid, current: np.ndarray, update) -> np.ndarray:
    instructions = list(strategy.configure_train(1, _arrays(current), ConfigRecord(), grid))
    replies = [_reply(m, _arrays(current + update(m)), 1) for m in instructions]
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["w"].numpy()


def _central(strategy="fedavg", sampling="poisson", reproducible=False, **extra) -> FederatedConfig:
    return FederatedConfig(
        strategy=strategy,
        clients_per_round=10,
        server_learning_rate=extra.pop("server_learning_rate", 1.0),
        server_momentum=extra.pop("server_momentum", 0.0),
        reproducible_noise=reproducible,
        central_dp=CentralDPConfig(noise_multiplier=2.0, clipping_norm=0.5, sampling=sampling),
        **extra,
    )


def test_server_noise_is_private_unless_reproducible():
    current = np.zeros(5000)
    zero = lambda _m: 0.0  # noqa: E731
    private = [_round(build_strategy(_central(), 100, seed=0), InProcessGrid(100), current, zero)]
    private.append(
        _round(build_strategy(_central(), 100, seed=0), InProcessGrid(100), current, zero)
    )
    assert np.abs(private[0] - private[1]).mean() > 0.05
    seeded = [
        _round(
            build_strategy(_central(reproducible=True), 100, 0), InProcessGrid(100), current, zero
        )
        for _ in range(2)
    ]
    np.testing.assert_array_equal(seeded[0], seeded[1])


@pytest.mark.parametrize(
    "strategy, options",
    [
        ("fedavg", {}),
        ("fedprox", {"proximal_mu": 0.1}),
        ("fedavgm", {"server_momentum": 0.9}),
        ("fedadam", {"server_learning_rate": 0.01, "server_tau": 1e-3}),
    ],
)
def test_user_level_noise_on_the_aggregate_is_sigma_c_over_n_before_the_server_step(
    strategy, options
):
    """What the wrapped strategy aggregates is the clipped mean plus N(0, (σC/n)²), n the
    expected cohort, for every server optimizer; its own step comes after (post-processing)."""
    fed = _central(strategy, **options)
    wrapper = build_strategy(fed, 100, seed=0)
    assert isinstance(wrapper, UserLevelDP)
    seen: list[np.ndarray] = []
    inner_aggregate = wrapper.strategy.aggregate_train

    def spy(server_round, replies):
        replies = list(replies)
        seen.append(replies[0].content["arrays"]["w"].numpy().copy())
        return inner_aggregate(server_round, replies)

    wrapper.strategy.aggregate_train = spy  # type: ignore[method-assign]
    current = np.zeros(20000)
    direction = np.zeros(20000)
    direction[0] = 1.0
    out = _round(wrapper, InProcessGrid(100), current, lambda _m: 5.0 * direction)  # clipped to C
    fed_cfg = fed.central_dp
    assert fed_cfg is not None
    expected_std = fed_cfg.noise_multiplier * fed_cfg.clipping_norm / 10
    noise = seen[0][1:]  # the clipped signal sits in coordinate 0 only
    assert noise.std() == pytest.approx(expected_std, rel=0.03)
    assert abs(noise.mean()) < 4 * expected_std / np.sqrt(len(noise))
    signal = wrapper.last_sampled * fed_cfg.clipping_norm / 10
    assert seen[0][0] == pytest.approx(signal, abs=5 * expected_std)
    # The server step is a function of that noised mean alone: a fresh strategy given it as its
    # only reply lands on the same model.
    fresh = build_strategy(dataclasses.replace(fed, central_dp=None), 1, seed=0)
    grid = InProcessGrid(1)
    reference = _round(fresh, grid, current, lambda _m: seen[0] - current)
    np.testing.assert_allclose(out, reference, atol=1e-6)


def test_poisson_sampling_draws_a_random_cohort_and_fixed_draws_exactly_it():
    poisson = build_strategy(_central(), 200, seed=0)
    fixed = build_strategy(_central(sampling="fixed"), 200, seed=0)
    grid = InProcessGrid(200)
    sizes = []
    for _ in range(200):
        sizes.append(
            len(list(poisson.configure_train(1, _arrays(np.zeros(2)), ConfigRecord(), grid)))
        )
        assert len(list(fixed.configure_train(1, _arrays(np.zeros(2)), ConfigRecord(), grid))) == 10
    assert np.mean(sizes) == pytest.approx(10, rel=0.1) and len(set(sizes)) > 3
    assert 0 in sizes or min(sizes) < 10  # the count itself is random


def test_a_poisson_round_that_samples_nobody_still_releases_noise():
    wrapper = build_strategy(_central(), 100, seed=0)
    assert isinstance(wrapper, UserLevelDP)
    wrapper.configure_train(1, _arrays(np.zeros(100)), ConfigRecord(), InProcessGrid(100))
    arrays, _ = wrapper.aggregate_train(1, [])
    assert np.abs(arrays["w"].numpy()).mean() > 0.01


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_federation_epsilon_equals_a_fresh_accountant_for_the_sampling_run(sampling):
    fed = _central(sampling=sampling)
    ledger = PrivacyLedger()
    for round_ in range(1, 41):
        ledger.record(central_event(fed, 1000, round_))
    delta = fed.central_dp.delta_for(1000)
    assert delta == pytest.approx(min(1e-5, 1000**-1.1))
    if sampling == "poisson":
        fresh = RDPAccountant()
        for _ in range(40):
            fresh.step(noise_multiplier=2.0, sample_rate=10 / 1000)
    else:  # replace-one: the sum moves by up to 2C, so σ relative to it is 2.0 / 2
        fresh = rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        fresh.compose(
            dp_accounting.SampledWithoutReplacementDpEvent(
                1000, 10, dp_accounting.GaussianDpEvent(1.0)
            ),
            40,
        )
    assert ledger.epsilon("server", delta) == pytest.approx(fresh.get_epsilon(delta), rel=1e-9)


def test_a_reply_that_skips_clipping_or_does_not_fit_is_clipped_or_dropped():
    wrapper = build_strategy(_central(sampling="fixed"), 10, seed=0)
    assert isinstance(wrapper, UserLevelDP)
    wrapper.noise_multiplier = 0.0
    instructions = list(
        wrapper.configure_train(1, _arrays(np.zeros(4)), ConfigRecord(), InProcessGrid(10))
    )
    huge = _reply(instructions[0], _arrays(np.full(4, 1000.0)), 1)
    bad = Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.full(3, np.nan, dtype=np.float32))}),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        ),
        reply_to=instructions[1],
    )
    arrays, metrics = wrapper.aggregate_train(1, [huge, bad])
    assert np.linalg.norm(arrays["w"].numpy()) == pytest.approx(0.5 / 10, rel=1e-5)
    assert metrics["dp-replies"] == 1


def test_round_generators_are_private_or_seeded():
    assert round_generator(None)(1, 0).random() != round_generator(None)(1, 0).random()
    assert round_generator(3)(1, 0).random() == round_generator(3)(1, 0).random()
    assert round_generator(3)(1, 0).random() != round_generator(3)(2, 0).random()
    assert round_generator(3)(1, 0).random() != round_generator(3)(1, 1).random()  # streams


def test_the_inprocess_loop_stops_before_the_round_that_would_exceed_the_budget(tmp_path):
    from fedrec.config import parse_config
    from fedrec.population import population_of
    from fedrec.privacy import epsilon
    from simulations.inprocess import run_inprocess

    two, three = (epsilon([(1.0, 1.0, n)], 1e-5) for n in (2, 3))
    config = parse_config(
        {
            "data": {
                "source": "synthetic",
                "synthetic": {"num_users": 10, "num_items": 30, "mean_length": 12, "seed": 0},
            },
            "model": {"name": "hstu", "max_len": 10, "embedding_dim": 8, "num_blocks": 1},
            "evaluation": {"ks": [10]},
            "federated": {
                "num_rounds": 5,
                "clients_per_round": 100,  # everyone: q = 1
                "eval_every": 5,
                "central_dp": {"noise_multiplier": 1.0, "target_epsilon": (two + three) / 2},
            },
        }
    )
    results = run_inprocess(population_of(config), tmp_path, progress=False)
    assert results["rounds"] == 2 and "round 3 would exceed" in results["stopped_early"]
    assert results["final"]["epsilon"]["federation"] == pytest.approx(two)
    assert "test" in results["final"]  # the last round run is evaluated
