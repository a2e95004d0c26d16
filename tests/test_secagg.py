"""Secure aggregation (SecAgg+, issue 14): the server gets the sum of the clipped updates and
nothing else; clients that decline or drop out cost the round nothing but their update; the
distributed noise adds up to DP-FedAvg's; settings that cannot work are refused at load."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow

from clients.secagg import DROP_OUT, secure_aggregation_mod
from fedrec.config import ExperimentConfig
from fedrec.federation import CentralDPConfig, FederatedConfig, SecureAggregationConfig
from fedrec.federation.secure import (
    clipping_range,
    noise_share_std,
    quantization_range,
    share_graph,
)
from server import secagg
from server.dp import UserLevelDP
from server.secagg import SecureAggregation
from server.strategy import build_strategy
from simulations.inprocess import InProcessGrid

CLIENTS = 10
GLOBAL = {"w": np.zeros((30, 20), dtype=np.float32), "b": np.zeros(20, dtype=np.float32)}
CLIP = 1.0


def _fed(
    noise: str = "central",
    sigma: float = 0.0,
    clients: int = CLIENTS,
    reproducible: bool = True,
    **secure: Any,
) -> FederatedConfig:
    settings = {"num_shares": 5, "reconstruction_threshold": 3, **secure}
    return FederatedConfig(
        num_partitions=clients,
        clients_per_round=clients,
        reproducible_noise=reproducible,
        central_dp=CentralDPConfig(noise_multiplier=sigma, clipping_norm=CLIP, sampling="fixed"),
        secure_aggregation=SecureAggregationConfig(noise=noise, **settings),
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
    update: Callable[[int], dict[str, np.ndarray]] = _update,
    tampering: Callable[[int, Message], Message] | None = None,
) -> ClientApp:
    """A device whose round trains to global + ``update(partition)``, behind fedrec's SecAgg+
    mod; clients in ``declining`` are past their budget, client p of ``failing`` raises at
    that SecAgg+ stage, and ``tampering`` may rewrite any reply before it leaves."""
    app = ClientApp(mods=[_tampered(tampering), _fails_at(failing or {})])
    experiment = ExperimentConfig(federated=fed)

    @app.query("participation")
    def participation(msg: Message, context: Context) -> Message:
        joins = context.node_config["partition-id"] not in declining
        answer = ConfigRecord({"joins": joins, "reason": "" if joins else "past its budget"})
        return Message(RecordDict({"config": answer}), reply_to=msg)

    @app.train(
        mods=[
            secure_aggregation_mod(
                lambda _ctx: experiment, lambda ctx: int(ctx.node_config["partition-id"])
            )
        ]
    )
    def train(msg: Message, context: Context) -> Message:
        sent = msg.content.array_records["arrays"].to_numpy_ndarrays()
        moved = update(int(context.node_config["partition-id"]))
        trained = _arrays({k: s + moved[k] for k, s in zip(GLOBAL, sent, strict=True)})
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


def _tampered(tampering: Callable[[int, Message], Message] | None):
    def mod(msg: Message, context: Context, call_next):
        reply = call_next(msg, context)
        if tampering is None:
            return reply
        return tampering(int(context.node_config["partition-id"]), reply)

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
    drop_out: float = 0.0,
    metrics_problem: Callable[[MetricRecord], str] = lambda _m: "",
    before: Callable[[InProcessGrid], None] | None = None,
    **behaviour: Any,
) -> tuple[dict[str, np.ndarray] | None, dict[str, Any], list[Message], _Recorder]:
    """One SecAgg+ round over toy devices (``_app(fed, **behaviour)``, one per partition):
    (the new global model, the round's train facts, the replies booked in the ledger, the
    server's view of the traffic)."""
    clients = fed.clients_per_round
    dp = build_strategy(fed, clients, seed=0)
    assert isinstance(dp, UserLevelDP)
    booked: list[Message] = []
    secure = SecureAggregation(fed, dp, lambda _r, replies: booked.extend(replies), metrics_problem)
    transport = InProcessGrid(clients, _app(fed, **behaviour), {DROP_OUT: drop_out})
    if before is not None:
        before(transport)
    grid = _Recorder(transport)
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
    """The default graph (every client shares with the whole round, any 60 % rebuild)."""
    fed = _fed(num_shares=1.0, reconstruction_threshold=0.6)
    model, facts, booked, _ = _round(fed, drop_out=0.3)
    dropped = facts["secagg-dropped"]
    assert dropped == 3  # 30 % of 10
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
    model, facts, booked, _ = _round(fed, drop_out=0.4)
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
        monkeypatch.setattr(secagg, "SecAggPlus", _FlowersWorkflow)
    model, facts, booked, grid = _round(_fed(), failing={2: stage})
    if workflow == "flower":
        assert model is None
        asked_for_missing_shares = [
            m for m in grid.received if m.has_error() and m.error.reason.startswith("KeyError")
        ]
        assert len(asked_for_missing_shares) >= 2
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


@pytest.mark.parametrize("reproducible", [True, False])
def test_distributed_noise_adds_up_to_dp_fedavgs(reproducible):
    """Ten clients each add N(0, (σC)²/m), m = 5: the unmasked sum carries N(0, 2 (σC)²) plus
    the updates, so (release − noiseless release) × cohort has std σC√2."""
    sigma = 1.0
    fed = _fed("distributed", sigma=sigma, min_contributors=5, reproducible=reproducible)
    assert noise_share_std(fed) == pytest.approx(sigma * CLIP / np.sqrt(5))
    model, _, _, _ = _round(fed)
    expected = _plain_mean(list(range(CLIENTS)))
    assert model is not None
    noise = np.concatenate([((model[k] - expected[k]) * CLIENTS).ravel() for k in GLOBAL])
    assert noise.std() == pytest.approx(sigma * CLIP * np.sqrt(2), rel=0.12)
    assert abs(noise.mean()) < 4 * sigma * CLIP * np.sqrt(2 / noise.size)


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
    assert model is None and facts["secagg-dropped"] == 6
    unmask_requests = [
        m
        for m in grid.received
        if not m.has_error()
        and Key.SHARE_LIST in m.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]
    assert unmask_requests == []
    # The masked updates never unmasked are still booked: ε is never under-reported.
    assert len(_contributors(booked)) == CLIENTS - facts["secagg-dropped"]


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
        ({"min_contributors": 2}, "min_contributors must be >= 3"),
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
    monkeypatch.setenv("FEDREC_SECAGG_DROP_OUT", "0.2")
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
    # Against the server: one Gaussian release per round a user's update was in a sum, with
    # no amplification by sampling (it knows who took part); here every client is sampled,
    # so it equals the federation's ε of this one round.
    assert line["epsilon"]["server_view_max"] == pytest.approx(line["epsilon"]["federation"])
    levels = [g["level"] for g in report["guarantees"]]
    assert "user-level against the server (SecAgg+, distributed noise)" in levels


def _masked_reply(message: Message) -> bool:
    if message.has_error():
        return False
    return Key.MASKED_PARAMETERS in message.content.config_records.get(RECORD_KEY_CONFIGS, {})


def test_a_masked_update_whose_metrics_are_not_believed_never_enters_the_sum():
    """Its DP statement could not be booked, so its update must not be released either: the
    server refuses the reply before Flower sums it and unmasks the sum without it."""
    model, facts, booked, _ = _round(
        _fed(), metrics_problem=lambda m: "lies" if m.get("partition-id") == 4 else ""
    )
    survivors = [p for p in range(CLIENTS) if p != 4]
    assert _contributors(booked) == survivors and facts["secagg-dropped"] == 1
    assert model is not None
    expected = _plain_mean(survivors)
    for key in GLOBAL:
        assert np.abs(model[key] - expected[key]).max() < 1e-5


@pytest.mark.parametrize("damage", ["one array short", "wrong shape", "lists of two lengths"])
def test_a_malformed_reply_is_a_dropout_not_a_crash(damage):
    def tamper(partition: int, reply: Message) -> Message:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if partition != 6 or configs is None or reply.has_error():
            return reply
        if damage != "lists of two lengths" and Key.MASKED_PARAMETERS in configs:
            vectors = list(configs[Key.MASKED_PARAMETERS])
            if damage == "one array short":
                vectors = vectors[:-1]
            else:
                vectors[1] = ndarray_to_bytes(np.zeros(7, dtype=np.int64))
            configs[Key.MASKED_PARAMETERS] = vectors
        if damage == "lists of two lengths" and Key.DESTINATION_LIST in configs:
            configs[Key.DESTINATION_LIST] = [*configs[Key.DESTINATION_LIST], 1]
        return reply

    model, facts, booked, _ = _round(_fed(), tampering=tamper)
    survivors = [p for p in range(CLIENTS) if p != 6]
    assert _contributors(booked) == survivors and facts["secagg-dropped"] == 1
    assert model is not None
    expected = _plain_mean(survivors)
    for key in GLOBAL:
        assert np.abs(model[key] - expected[key]).max() < 1e-5


def test_a_tampered_weight_cannot_blow_the_model_up():
    """A client that shifts its masked weight so the cohort's weights sum to 1 makes Flower
    scale the sum by 2²⁴: the released mean would leave [-R, R]. The server refuses it."""

    def tamper(partition: int, reply: Message) -> Message:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if partition == 0 and configs is not None and Key.MASKED_PARAMETERS in configs:
            vectors = list(configs[Key.MASKED_PARAMETERS])
            weight = bytes_to_ndarray(vectors[0])
            levels = quantization_range(CLIENTS)
            vectors[0] = ndarray_to_bytes(weight - CLIENTS * levels + 1)  # weights sum to 1
            configs[Key.MASKED_PARAMETERS] = vectors
        return reply

    model, _, booked, _ = _round(_fed(), tampering=tamper)
    assert model is None and len(_contributors(booked)) == CLIENTS


def test_a_malformed_participation_answer_keeps_the_client_out():
    def tamper(partition: int, reply: Message) -> Message:
        answer = reply.content.config_records.get("config")
        if partition == 3 and answer is not None and "joins" in answer:
            reply.content = RecordDict({"config": ConfigRecord({"joins": "yes"})})
        return reply

    model, facts, booked, _ = _round(_fed(), tampering=tamper)
    assert _contributors(booked) == [p for p in range(CLIENTS) if p != 3]
    assert facts["secagg-dropped"] == 1 and model is not None


@pytest.mark.parametrize("clients", [255, 257])
def test_a_cohort_at_the_edge_of_the_modulus_sums_without_wrapping(clients):
    """Every client sends +R in every coordinate (the top of the quantisation range): the
    sum of the cohort and of its weights must not wrap around 2³²."""
    fed = _fed(clients=clients)
    top = clipping_range(fed)
    model, facts, _, _ = _round(
        fed, update=lambda _p: {k: np.full(v.shape, top, np.float32) for k, v in GLOBAL.items()}
    )
    assert facts["dp-replies"] == clients and model is not None
    for key in GLOBAL:
        np.testing.assert_allclose(model[key], top, rtol=1e-5)


@pytest.mark.parametrize(
    ("shares", "threshold", "joined", "expected"),
    [
        (1.0, 0.6, 4, (4, 3)),  # 0.6 of 4 rounds to 2: raised to more than half
        (1.0, 0.6, 10, (10, 6)),
        (1.0, 0.51, 50, (50, 26)),
        (0.5, 0.6, 20, (11, 7)),  # 10 shares: made odd below the round
        (7, 4, 50, (7, 4)),
        (7, 4, 5, (5, 4)),  # capped at the round, threshold kept above half
    ],
)
def test_the_share_graph_keeps_more_than_half_and_never_an_even_count_below_the_round(
    shares, threshold, joined, expected
):
    fed = _fed(num_shares=shares, reconstruction_threshold=threshold)
    count, needed = share_graph(fed, joined)
    assert (count, needed) == expected
    assert 2 * needed > count and (count == joined or count % 2 == 1)


def test_the_default_full_graph_runs_with_four_clients():
    fed = _fed(clients=4, num_shares=1.0, reconstruction_threshold=0.6, min_contributors=3)
    model, facts, _, _ = _round(fed)
    assert model is not None and facts["dp-replies"] == 4


def test_a_client_refuses_to_send_its_update_in_the_clear():
    """A federation configured for SecAgg+ whose server sends a plain train message: the
    client's mod refuses (an error reply), it never trains or replies with arrays."""
    fed = _fed()
    app = _app(fed)
    message = Message(
        RecordDict({"arrays": _arrays(GLOBAL), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    context = Context(
        run_id=0, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    with pytest.raises(PermissionError, match="in the clear"):
        app(message, context)


def test_a_client_refuses_a_setup_that_is_not_its_configs():
    """The server announces a clipping range other than the config's: every client refuses
    at setup, nothing is masked or released."""
    fed = _fed()

    def announce(grid):  # the server's setup, with a doubled clipping range
        original = grid.send_and_receive

        def send_and_receive(messages, *, timeout=None):
            messages = list(messages)
            for m in messages:
                configs = m.content.config_records.get(RECORD_KEY_CONFIGS)
                if configs is not None and configs.get(Key.STAGE) == "setup":
                    configs[Key.CLIPPING_RANGE] = 2 * clipping_range(fed)
            return original(messages, timeout=timeout)

        grid.send_and_receive = send_and_receive

    model, _, booked, grid = _round(fed, before=announce)
    assert model is None and _contributors(booked) == []
    assert not any(_masked_reply(m) for m in grid.received)
