"""Property-based fuzzing (hypothesis): the server never crashes on a reply and never
aggregates an invalid one; the loaders either load or refuse with a FedrecDataError."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedrec.data.loaders import load_recbole, load_sequences
from fedrec.errors import FedrecDataError
from fedrec.federation import FederatedConfig
from server.strategy import LedgerKeeper, build_strategy
from server.validation import ReplyValidator
from simulations.inprocess import InProcessGrid

from .conftest import reply

GLOBAL = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

floats = st.sampled_from([np.float32, np.float64])
arrays = st.one_of(
    # the model's form with any values (NaN, inf, huge, subnormal)
    st.fixed_dictionaries(
        {key: hnp.arrays(dtype=floats, shape=value.shape) for key, value in GLOBAL.items()}
    ),
    # any form
    st.dictionaries(
        st.sampled_from(["w", "b", "extra"]),
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float64, np.int32, np.bool_]),
            shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=4),
        ),
        max_size=3,
    ),
)
metric_values = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.floats(allow_nan=True), max_size=3),
)
metrics = st.one_of(
    st.fixed_dictionaries({"num-examples": st.integers(0, 10**12)}),  # well formed
    st.dictionaries(
        st.sampled_from(["num-examples", "train-loss", "dp-steps", "refused"]), metric_values
    ),
)


def _fuzzed(message: Message, values: dict, sent: dict, drop: str) -> Message:
    content = RecordDict()
    if drop != "arrays":
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in values.items()})
    if drop != "metrics":
        content["metrics"] = MetricRecord(sent)
    TaskIdentity.node_id = message.metadata.dst_node_id
    out = Message(content, reply_to=message)
    TaskIdentity.node_id = 0
    return out


@FAST
@given(values=arrays, sent=metrics, drop=st.sampled_from(["", "arrays", "metrics"]))
def test_no_reply_crashes_the_server_or_reaches_the_model(values, sent, drop):
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 0
    fed = FederatedConfig(clients_per_round=3)
    strategy = ReplyValidator(
        LedgerKeeper(build_strategy(fed, 3, seed=0), lambda *_: None), True, True
    )
    global_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    instructions = sorted(
        strategy.configure_train(1, global_arrays, ConfigRecord(), InProcessGrid(3)),
        key=lambda m: m.metadata.dst_node_id,
    )
    honest = {k: v + 0.5 for k, v in GLOBAL.items()}
    replies = [
        reply(m, ArrayRecord({k: Array(v) for k, v in honest.items()}), 5) for m in instructions[1:]
    ]
    replies.insert(0, _fuzzed(instructions[0], values, sent, drop))
    aggregated, facts = strategy.aggregate_train(1, replies)
    assert aggregated is not None and facts is not None
    model = {k: v.numpy() for k, v in aggregated.items()}
    assert model.keys() == GLOBAL.keys()
    for key, value in model.items():
        assert value.shape == GLOBAL[key].shape and np.isfinite(value).all()
    if int(facts["rejected"]) == 0:  # accepted: it was a valid reply of the right form
        assert drop == "" and set(values) == set(GLOBAL)


tokens = st.sampled_from(["1", "2", "10", "3.5", "-4", "nan", "inf", "-inf", "x", "", "1,2"])
lines = st.lists(
    st.one_of(
        st.tuples(tokens, tokens, tokens, tokens).map("\t".join),  # a row of the header's form
        st.lists(tokens, min_size=1, max_size=5).map("\t".join),
        st.lists(tokens, min_size=1, max_size=5).map(" ".join),
        st.text(alphabet="0123456789\t .,;-abnNiIf:", max_size=30),  # anything
    ),
    max_size=6,
)


rows_of_four = st.lists(st.tuples(tokens, tokens, tokens, tokens).map("\t".join), max_size=4)


@FAST
@given(rows=st.one_of(rows_of_four, lines))
def test_a_recbole_file_loads_or_is_refused_with_its_line(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("fuzz") / "toy"  # the loader reads <folder name>.inter
    folder.mkdir()
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    (folder / "toy.inter").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    try:
        dataset = load_recbole(folder)
    except FedrecDataError:
        return
    assert np.isfinite(dataset.timestamps).all()


sequences = st.lists(
    st.tuples(
        st.sampled_from(["1", "2", "3"]), st.lists(st.sampled_from(["4", "5", "x"]), max_size=3)
    ).map(lambda line: " ".join([line[0], *line[1]])),
    max_size=4,
)


@FAST
@given(rows=st.one_of(sequences, lines))
def test_a_sequences_file_loads_or_is_refused_with_its_line(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("seq") / "seq.txt"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    try:
        dataset = load_sequences(path)
    except FedrecDataError:
        return
    firsts = [row.split()[0] for row in rows if row.split()]
    assert len(firsts) == len(set(firsts)) == dataset.num_users  # one line per user, or refused
