"""The server's fast reads of Flower arrays against Flower's own (``Array.numpy``), and its
pre-averaging against the strategy averaging every reply itself."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedrec.federation.arrays import array_numpy, record_numpy, state_record
from server.sampling import CohortSampler, round_generator


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(5),
        np.ones((), dtype=np.float64),
        np.zeros((0, 2), dtype=np.float32),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.array([True, False]),
    ],
    ids=["float32", "int64", "scalar", "empty", "fortran", "bool"],
)
def test_fast_reads_equal_numpy_load(value):
    array = Array(value)
    read = array_numpy(array)
    expected = array.numpy()
    assert read.dtype == expected.dtype and read.shape == expected.shape
    assert np.array_equal(read, expected)


def test_a_reply_whose_declared_shape_lies_reads_as_numpy_would():
    """Validation and aggregation must see one array: a header that is not the canonical one
    for the declared dtype and shape is read by numpy itself."""
    data = Array(np.ones((2, 3), dtype=np.float32)).data
    for dtype, shape in (("float32", (3, 2)), ("float64", (3,)), ("float32", (-1, 6))):
        forged = Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)
        assert array_numpy(forged).shape == forged.numpy().shape == (2, 3)
    truncated = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data[:-4])
    with pytest.raises(ValueError):
        array_numpy(truncated)
    # A subarray dtype whose canonical header is a void one: numpy reads void, so must we.
    void = Array(np.zeros(3, dtype="V4")).data
    subarray = Array(dtype="(1,)f4", shape=(3,), stype="numpy.ndarray", data=void)
    assert array_numpy(subarray).dtype == subarray.numpy().dtype == np.dtype("V4")
    # A header claiming 10^10 values on a 12-byte payload is refused before any allocation.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**10,)}
    )
    huge = Array(
        dtype="float32", shape=(3,), stype="numpy.ndarray", data=header.getvalue() + bytes(12)
    )
    with pytest.raises(ValueError, match="not one"):
        array_numpy(huge)
    with pytest.raises(ValueError, match=r"not a \.npy"):
        array_numpy(Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"garbage"))
    record = ArrayRecord({"a": Array(np.arange(3.0)), "b": Array(np.eye(2))})
    for got, want in zip(record_numpy(record), record.to_numpy_ndarrays(), strict=True):
        assert np.array_equal(got, want)


def _replies(count: int, rng: np.random.Generator) -> list[Message]:
    replies = []
    for _ in range(count):
        arrays = ArrayRecord(
            {
                "w": Array(rng.normal(size=(4, 3)).astype(np.float32)),
                "b": Array(rng.normal(size=3).astype(np.float32)),
            }
        )
        metrics = MetricRecord(
            {"num-examples": int(rng.integers(1, 9)), "train-loss": float(rng.random())}
        )
        replies.append(
            Message(
                RecordDict({"arrays": arrays, "metrics": metrics}),
                dst_node_id=0,
                message_type=MessageType.TRAIN,
            )
        )
    return replies


@pytest.mark.parametrize("kind", [FedAvg, FedAdam])
def test_pre_averaging_gives_the_strategy_s_own_aggregate(kind, monkeypatch):
    for name in ("_run_id", "_task_id", "_node_id"):  # a server's messages need an identity
        monkeypatch.setattr(TaskIdentity, name, 0, raising=False)
    current = ArrayRecord(
        {"w": Array(np.zeros((4, 3), np.float32)), "b": Array(np.zeros(3, np.float32))}
    )
    results = []
    for averages in (False, True):
        strategy = kind(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0)
        if kind is FedAdam:  # its step needs the arrays it sent
            strategy.current_arrays = dict(zip(current.keys(), record_numpy(current), strict=True))
        sampler = CohortSampler(strategy, 5, 10, "fixed", round_generator(1), averages=averages)
        results.append(sampler.aggregate_train(1, _replies(6, np.random.default_rng(1))))
    (plain_arrays, plain_metrics), (fast_arrays, fast_metrics) = results
    assert plain_arrays is not None and fast_arrays is not None
    for got, want in zip(record_numpy(fast_arrays), record_numpy(plain_arrays), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert dict(fast_metrics) == pytest.approx(dict(plain_metrics))


def test_state_record_writes_what_flowers_array_record_writes():
    state = {
        "table": torch.randn(7, 3),
        "bias": torch.arange(5, dtype=torch.float64),
        "scalar": torch.tensor(2.5),
        "counts": np.arange(6, dtype=">i4").reshape(2, 3),  # another byte order
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    ours = state_record(state)
    flowers = ArrayRecord(  # Flower's np.save, array by array
        {k: Array(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    )
    assert list(ours.keys()) == list(flowers.keys())
    for key in state:
        a, b = ours[key], flowers[key]
        assert (a.dtype, tuple(a.shape), a.stype, a.data) == (
            b.dtype,
            tuple(b.shape),
            b.stype,
            b.data,
        )
        assert np.array_equal(array_numpy(a), b.numpy())
