"""Secure aggregation (SecAgg+, issue 14): the server gets the sum of the clipped updates and
nothing else; clients that decline or drop out cost the round nothing but their update; the
distributed noise adds up to DP-FedAvg's; settings that cannot work are refused at load."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow

from clients.secagg import DROP_OUT, secure_aggregation_mod
from fedrec.config import ExperimentConfig
from fedrec.federation import CentralDPConfig, FederatedConfig, SecureAggregationConfig
from fedrec.federation.secure import clipping_range, noise_share_std, quantization_range
from server import secagg
from server.dp import UserLevelDP
from server.secagg import SecureAggregation
from server.strategy import build_strategy
from simulations.inprocess import InProcessGrid

CLIENTS = 10
GLOBAL = {"w": np.zeros((30, 20), dtype=np.float32), "b": np.zeros(20, dtype=np.float32)}
CLIP = 1.0


def _fed(noise: str = "central", sigma: float = 0.0, **secure: Any) -> FederatedConfig:
    return FederatedConfig(
        num_partitions=CLIENTS,
        clients_per_round=CLIENTS,
        reproducible_noise=True,
        central_dp=CentralDPConfig(noise_multiplier=sigma, clipping_norm=CLIP, sampling="fixed"),
        secure_aggregation=SecureAggregationConfig(
            num_shares=5, reconstruction_threshold=3, noise=noise, **secure
        ),
    )


def _update(partition: int) -> dict[str, np.ndarray]:
    """Client ``partition``'s update, clipped to CLIP as its round would."""
    rng = np.random.default_rng(100 + partition)
    raw = {k: rng.normal(0, 0.1, v.shape) for k, v in GLOBAL.items()}
    norm = np.sqrt(sum(float(np.sum(u * u)) for u in raw.values()))
    return {k: (u * min(1.0, CLIP / norm)).astype(np.float32) for k, u in raw.items()}


def _app(
    fed: FederatedConfig,
    declining: frozenset[int] = frozenset(),
    failing: dict[int, str] | None = None,
) -> ClientApp:
    """A device whose round trains to global + ``_update(partition)``, behind fedrec's SecAgg+
    mod; clients in ``declining`` are past their budget, and client p of ``failing`` raises
    at that SecAgg+ stage."""
    app = ClientApp(mods=[_fails_at(failing or {})])
    experiment = ExperimentConfig(federated=fed)

    @app.query("participation")
    def participation(msg: Message, context: Context) -> Message:
        joins = context.node_config["partition-id"] not in declining
        answer = ConfigRecord({"joins": joins, "reason": "" if joins else "past its budget"})
        return Message(RecordDict({"config": answer}), reply_to=msg)

    @app.train(mods=[secure_aggregation_mod(lambda _ctx: experiment)])
    def train(msg: Message, context: Context) -> Message:
        sent = msg.content.array_records["arrays"].to_numpy_ndarrays()
        update = _update(int(context.node_config["partition-id"]))
        trained = _arrays({k: s + update[k] for k, s in zip(GLOBAL, sent, strict=True)})
        metrics = MetricRecord({"partition-id": context.node_config["partition-id"], "refused": 0})
        content = RecordDict({"arrays": trained, "metrics": metrics})
        return Message(content, reply_to=msg)

    return app


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in values.items()})


def _fails_at(failing: dict[int, str]):
    def mod(msg: Message, context: Context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = failing.get(int(context.node_config["partition-id"]))
        if configs is not None and configs.get(Key.STAGE) == stage:
            raise ConnectionAbortedError(f"gone at {stage}")
        return call_next(msg, context)

    return mod


class _Recorder:
    """The grid, with everything the server receives kept."""

    def __init__(self, grid: InProcessGrid):
        self.grid = grid
        self.received: list[Message] = []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, *, timeout=None):
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        self.received.extend(replies)
        return replies


def _round(
    fed: FederatedConfig,
    *,
    declining: frozenset[int] = frozenset(),
    drop_out: float = 0.0,
    failing: dict[int, str] | None = None,
) -> tuple[dict[str, np.ndarray] | None, dict[str, Any], list[Message], _Recorder]:
    """One SecAgg+ round over ``CLIENTS`` toy devices: (the new global model, the round's
    train facts, the replies booked in the ledger, the server's view of the traffic)."""
    dp = build_strategy(fed, CLIENTS, seed=0)
    assert isinstance(dp, UserLevelDP)
    booked: list[Message] = []
    secure = SecureAggregation(fed, dp, lambda _r, replies: booked.extend(replies), lambda _m: "")
    grid = _Recorder(InProcessGrid(CLIENTS, _app(fed, declining, failing), {DROP_OUT: drop_out}))
    messages = dp.configure_train(1, _arrays(GLOBAL), ConfigRecord({"server-round": 1}), grid)
    arrays, facts = secure.train(grid, 1, messages)  # type: ignore[arg-type]
    model = None if arrays is None else {k: v.numpy() for k, v in arrays.items()}
    return model, dict(facts), booked, grid


def _contributors(booked: list[Message]) -> list[int]:
    return sorted(
        int(r.content.metric_records["metrics"]["partition-id"])
        for r in booked
        if not r.has_error() and "partition-id" in r.content.metric_records["metrics"]
    )


def _plain_mean(partitions: list[int]) -> dict[str, np.ndarray]:
    """DP-FedAvg without noise, in the clear: Σ updates / expected cohort."""
    return {k: sum(_update(p)[k] for p in partitions) / CLIENTS for k in GLOBAL}


def test_the_sum_is_the_plain_sum_within_quantisation():
    model, facts, booked, _ = _round(_fed())
    assert facts["dp-replies"] == CLIENTS and facts["secagg-dropped"] == 0
    expected = _plain_mean(list(range(CLIENTS)))
    assert model is not None
    step = 2 * clipping_range(_fed()) / quantization_range(CLIENTS)
    for key in GLOBAL:
        assert np.abs(model[key] - expected[key]).max() < 2 * step + 1e-7
        assert np.abs(expected[key]).max() > 1000 * step  # the model moved, by far more
    assert _contributors(booked) == list(range(CLIENTS))


def test_thirty_percent_dropping_out_mid_round_still_aggregates_the_rest():
    model, facts, booked, _ = _round(_fed(), drop_out=0.3)
    dropped = facts["secagg-dropped"]
    assert 1 <= dropped < CLIENTS - _fed().secure_min_contributors
    survivors = _contributors(booked)
    assert len(survivors) == CLIENTS - dropped == facts["dp-replies"]
    assert sum(r.has_error() for r in booked) == dropped  # booked as failures, not releases
    expected = _plain_mean(survivors)
    assert model is not None
    for key in GLOBAL:
        assert np.abs(model[key] - expected[key]).max() < 1e-5


def test_the_default_full_graph_survives_forty_percent_dropping_out():
    """Every client shares with the whole cohort, any 60 % of it rebuild a secret: 4 of 10
    dropping out mid-round still leaves a sum to unmask."""
    fed = dataclasses.replace(_fed(), secure_aggregation=SecureAggregationConfig(noise="central"))
    model, facts, booked, _ = _round(fed, drop_out=0.6)  # partitions 2, 3, 9 and one more
    assert facts["secagg-dropped"] == 4
    survivors = _contributors(booked)
    assert len(survivors) == 6 == facts["dp-replies"]
    assert model is not None
    expected = _plain_mean(survivors)
    for key in GLOBAL:
        assert np.abs(model[key] - expected[key]).max() < 1e-5


def test_a_client_past_its_budget_declines_before_it_shares_a_key():
    declining = frozenset({2, 7})
    model, facts, booked, grid = _round(_fed(), declining=declining)
    assert facts["secagg-declined"] == 2 and facts["secagg-dropped"] == 0
    assert _contributors(booked) == sorted(set(range(CLIENTS)) - declining)
    refusals = [r for r in booked if r.content.metric_records["metrics"].get("refused") == 1]
    assert len(refusals) == 2
    # Nothing but their answer ever came from them: no key, no masked vector.
    from_them = [m for m in grid.received if m.metadata.src_node_id - 1 in declining]
    assert [m.content.config_records["config"]["joins"] for m in from_them] == [False, False]
    expected = _plain_mean(sorted(set(range(CLIENTS)) - declining))
    assert model is not None
    for key in GLOBAL:
        assert np.abs(model[key] - expected[key]).max() < 1e-5


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS])
@pytest.mark.parametrize("workflow", ["fedrec", "flower"])
def test_a_client_that_fails_before_masking_leaves_the_round(monkeypatch, stage, workflow):
    """Why ``server.secagg`` subclasses the workflow: with Flower's, a client that fails at
    setup or while keys are shared makes every other client fail when asked for shares of its
    secrets, which it never sent, and the round is lost. With fedrec's it is left out."""
    if workflow == "flower":
        monkeypatch.setattr(secagg, "_SecAggPlus", _FlowersWorkflow)
    model, facts, booked, _ = _round(_fed(), failing={2: stage})
    if workflow == "flower":
        assert model is None
        return
    survivors = _contributors(booked)
    assert survivors == [p for p in range(CLIENTS) if p != 2] and facts["secagg-dropped"] == 1
    assert model is not None
    expected = _plain_mean(survivors)
    for key in GLOBAL:
        assert np.abs(model[key] - expected[key]).max() < 1e-5


class _FlowersWorkflow(SecAggPlusWorkflow):
    def __init__(self, *args, min_contributors: int, **kwargs):
        super().__init__(*args, **kwargs)


def test_the_server_receives_masked_vectors_only():
    _, _, _, grid = _round(_fed())
    masked = [
        m
        for m in grid.received
        if not m.has_error()
        and Key.MASKED_PARAMETERS in m.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]
    assert len(masked) == CLIENTS
    levels = quantization_range(CLIENTS)
    shift = clipping_range(_fed())
    for message in masked:
        # No array record crosses the network: the update travels only inside the mask.
        assert all(len(record) == 0 for record in message.content.array_records.values())
        vectors = message.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        weights = bytes_to_ndarray(vectors[1]).ravel()  # [0] is the weight
        update = _update(message.metadata.src_node_id - 1)["w"].ravel()
        quantized = (update + shift) * levels / (2 * shift)
        assert np.mean(np.abs(weights - quantized) <= 1) < 0.01  # uniform, not the update


def test_distributed_noise_adds_up_to_dp_fedavgs():
    """Ten clients each add N(0, (σC)²/m), m = 5: the unmasked sum carries N(0, 2 (σC)²) plus
    the updates, so (release − noiseless release) × cohort has std σC√2."""
    sigma = 1.0
    fed = _fed("distributed", sigma=sigma, min_contributors=5)
    assert noise_share_std(fed) == pytest.approx(sigma * CLIP / np.sqrt(5))
    model, _, _, _ = _round(fed)
    expected = _plain_mean(list(range(CLIENTS)))
    assert model is not None
    noise = np.concatenate([((model[k] - expected[k]) * CLIENTS).ravel() for k in GLOBAL])
    assert noise.std() == pytest.approx(sigma * CLIP * np.sqrt(2), rel=0.1)
    assert abs(noise.mean()) < 0.1


def test_central_noise_is_added_after_unmasking():
    sigma = 1.0
    model, _, _, _ = _round(_fed("central", sigma=sigma))
    expected = _plain_mean(list(range(CLIENTS)))
    assert model is not None
    noise = np.concatenate([((model[k] - expected[k]) * CLIENTS).ravel() for k in GLOBAL])
    assert noise.std() == pytest.approx(sigma * CLIP, rel=0.1)


def test_fewer_masked_updates_than_the_noise_needs_are_never_unmasked():
    """With 60 % dropping out, fewer than min_contributors (8) masked updates arrive: the
    server does not ask for the shares, nothing is released, the model stays."""
    fed = _fed("distributed", sigma=1.0, min_contributors=8)
    model, facts, booked, grid = _round(fed, drop_out=0.6)
    assert model is None and facts["secagg-dropped"] >= 3
    unmask_requests = [
        m
        for m in grid.received
        if not m.has_error()
        and Key.SHARE_LIST in m.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]
    assert unmask_requests == []
    assert booked  # the round is still in the ledger: ε is never under-reported


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_shares": 4, "reconstruction_threshold": 3}, "must be odd"),
        ({"num_shares": 1, "reconstruction_threshold": 3}, "1.0 for the whole cohort"),
        ({"num_shares": 5, "reconstruction_threshold": 2}, "more than half"),
        ({"num_shares": 5, "reconstruction_threshold": 5}, "more than half"),
        ({"reconstruction_threshold": 0.5}, "more than half"),
        ({"num_shares": 1.5}, r"lie in \(0, 1\]"),
        ({"reconstruction_threshold": 3}, "must be a fraction"),
        ({"noise": "local"}, "noise must be one of"),
        ({"min_contributors": 1}, "min_contributors must be >= 2"),
    ],
)
def test_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SecureAggregationConfig(**settings)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"central_dp": None}, "needs central_dp"),
        ({"strategy": "krum", "central_dp": None}, "does not compose"),
        ({"strategy": "trimmedmean"}, "does not compose"),
        ({"report_train_loss": True}, "report_train_loss"),
        ({"fraction_per_round": 0.1}, "min_contributors must be set"),
    ],
)
def test_federations_that_would_leak_or_not_compose_are_refused(options, message):
    base = {
        "central_dp": CentralDPConfig(),
        "secure_aggregation": SecureAggregationConfig(),
    }
    with pytest.raises(ValueError, match=message):
        FederatedConfig(**{**base, **options})


def test_quantisation_cannot_wrap_around():
    for cohort in (2, 10, 100, 1000, 4000):
        assert (cohort + 1) * quantization_range(cohort) <= 2**32
    with pytest.raises(ValueError, match="at most"):
        quantization_range(70_000)


def _synthetic(tmp_path, **federated: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "data": {
            "source": "synthetic",
            "synthetic": {"num_users": 20, "num_items": 40, "mean_length": 20, "seed": 0},
        },
        "model": {"name": "hstu", "max_len": 16, "embedding_dim": 8, "num_blocks": 1},
        "evaluation": {"ks": [10]},
        "audit": {"enabled": False},
        "federated": {
            "num_rounds": 1,
            "local_learning_rate": 0.05,
            "record_window": 8,
            "record_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "batch_size": 4},
            "central_dp": {"noise_multiplier": 0.3, "clipping_norm": 1.0, "sampling": "fixed"},
            "reproducible_noise": True,  # the same cohorts in every run of the test
            "secure_aggregation": {"min_contributors": 3},
            **federated,
        },
    }


def test_a_federation_under_secagg_drop_outs_and_declines_keeps_going(tmp_path, monkeypatch):
    """HSTU clients in-process. A first run spends one DP-SGD release on 6 of 14 devices. A new
    run in the same folder (its server ledger fresh, so the server does not know) sets a budget
    that one more release would pass: those 6 decline at setup; of the rest, a third drop out
    mid-round; the round is aggregated from the others, the model moves, and the privacy
    report says what SecAgg+ protects."""
    import json

    from fedrec.config import parse_config
    from fedrec.population import population_of
    from simulations.inprocess import run_inprocess

    run_dir = tmp_path / "run"
    first = parse_config(_synthetic(tmp_path, clients_per_round=6))
    run_inprocess(population_of(first), run_dir, progress=False)
    spent = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    one_release = spent["epsilon"]["client_max"]
    assert spent["train"]["dp-replies"] == 6

    before = torch.load(run_dir / "model.pt", weights_only=True)
    second = parse_config(
        _synthetic(tmp_path, clients_per_round=14, record_epsilon_budget=1.1 * one_release)
    )
    monkeypatch.setenv("FEDREC_SECAGG_DROP_OUT", "0.34")
    run_inprocess(population_of(second), run_dir, progress=False)
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    facts = line["train"]
    assert facts["secagg-sampled"] == 14 and facts["secagg-declined"] == 6
    assert facts["secagg-dropped"] >= 1
    assert facts["dp-replies"] == 8 - facts["secagg-dropped"] >= 3
    assert line["refused"] == 6
    after = torch.load(run_dir / "model.pt", weights_only=True)
    moved = sum(float(((after[k] - before[k]) ** 2).sum()) for k in after)
    assert moved > 0
    report = json.loads((run_dir / "privacy.json").read_text())
    assert any("SecAgg+" in text and "distributed" in text for text in report["not_covered"])
