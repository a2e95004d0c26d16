"""The gRPC RecommendService end to end over TLS on 127.0.0.1: answers equal the funnel's, every
bad request is INVALID_ARGUMENT and the server keeps serving, a bundle swap under load drops
nothing, altered bundles are refused, and the checked-in stubs are what `make protos` makes."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from fedrec.data import SyntheticConfig, generate_synthetic, leave_one_out
from fedrec.data.catalogue import ItemCatalogue
from fedrec.errors import FedrecDataError
from fedrec.models.ranking import ranker_class
from fedrec.models.registry import build_model, model_config
from fedrec.semantic_id.retrieval import CodeVocabulary, RetrievalConfig
from fedrec.semantic_id.retrieval import build_model as build_retrieval_model
from fedrec.serving.bundle import ModelBundle
from fedrec.serving.features import USER_ATTRIBUTES, FeatureTables
from fedrec.serving.funnel import FunnelConfig, FunnelResult
from fedrec.serving.proto import recommend_pb2 as pb
from fedrec.serving.proto import recommend_pb2_grpc as pb_grpc
from fedrec.serving.service import (
    MAX_HISTORY,
    Batcher,
    BundleWatcher,
    Recommender,
    RecommendServicer,
    serve,
)
from fedrec.serving.sources import SEMANTIC_ID_SOURCE, generative_source
from fedrec.serving.store import (
    MANIFEST,
    MODEL_PART,
    GenerativeRetriever,
    _manifest_hash,
    load_serving_bundle,
    write_serving_bundle,
)
from server.certs import make_credentials

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(max_len=20, embedding_dim=8, num_blocks=1, num_heads=2, dropout=0.0)


@pytest.fixture(scope="module")
def data():
    dataset = generate_synthetic(
        SyntheticConfig(num_users=40, num_items=60, mean_length=12, max_length=30, seed=5)
    )
    return dataset, leave_one_out(dataset)


def write_bundle(folder: Path, data, version: int, seed: int = 0, rerank: str = "") -> str:
    dataset, split = data
    torch.manual_seed(seed)
    model = build_model("hstu", split.num_items, model_config("hstu", MODEL))
    catalogue = ItemCatalogue.from_dataset(dataset, popularity=split.train_item_counts())
    users = {a: dataset.user_features.get(a, np.array([])).tolist() for a in USER_ATTRIBUTES}
    tables = FeatureTables.build(catalogue, users)
    ranker = ranker_class("mmoe-dcn")(tables.ranker_config(user_dim=8, sources=2, experts=2))
    bundle = ModelBundle(
        version, "model: hstu\n", catalogue.to_text(), catalogue.content_hash, model.state_dict()
    )
    funnel = FunnelConfig(
        sources=("hstu", "popularity"),
        retrieve_n=20,
        rank=True,
        rerank=rerank,
        rerank_lambda=0.9,
    )
    return write_serving_bundle(
        folder,
        bundle,
        "hstu",
        MODEL,
        ranker,
        tables.vocabularies,
        funnel,
        {"client_max": 3.5, "client_max_delta": 1e-5},
    )


@contextlib.contextmanager
def running_service(root: Path, data, batched: bool = True):
    """A TLS service on a free port of 127.0.0.1 serving ``root/bundles/v1``."""
    write_bundle(root / "bundles" / "v1", data, version=1)
    certs = make_credentials(root / "certs", ["127.0.0.1"], [])
    servicer = RecommendServicer(
        Recommender(load_serving_bundle(root / "bundles" / "v1"), torch.device("cpu")),
        Batcher(16) if batched else None,
    )
    server, port = serve(
        servicer, "127.0.0.1:0", certs.server_cert.read_bytes(), certs.server_key.read_bytes()
    )
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(certs.ca_cert.read_bytes())
    )
    try:
        yield servicer, pb_grpc.RecommendServiceStub(channel), root, port
    finally:
        channel.close()
        server.stop(None)


@pytest.fixture(scope="module")
def service(tmp_path_factory, data):
    with running_service(tmp_path_factory.mktemp("service"), data) as running:
        yield running


def request_of(data, user: int, k: int = 5, **context) -> pb.RecommendRequest:
    dataset, split = data
    items, times = split.full(user)
    raw = dataset.raw_item_ids
    return pb.RecommendRequest(
        history=[
            pb.Event(item=str(raw[i]), timestamp=int(t)) for i, t in zip(items, times, strict=True)
        ],
        context=context,
        k=k,
    )


def test_recommend_over_tls_equals_the_funnel(service, data):
    servicer, stub, _, _ = service
    dataset, split = data
    reply = stub.Recommend(request_of(data, 3, k=7, gender="F", age="25-34"), timeout=30)
    assert len(reply.items) == 7 and reply.bundle_version == 1
    items, times = split.full(3)
    expected = servicer.current.recommend(
        [(items, times.astype(np.int64))], [{"gender": "F", "age": "25-34"}]
    )
    assert [r.item for r in reply.items] == [
        str(dataset.raw_item_ids[i]) for i in expected.items[0, :7]
    ]
    np.testing.assert_allclose([r.score for r in reply.items], expected.scores[0, :7], rtol=1e-6)
    assert {r.stage for r in reply.items} == {"ranker"}
    assert not {r.item for r in reply.items} & {str(dataset.raw_item_ids[i]) for i in items}
    assert stub.Health(pb.HealthRequest(), timeout=10).status == "SERVING"
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.bundle_version == 1 and info.epsilon == pytest.approx(3.5)
    assert info.delta == pytest.approx(1e-5) and info.epsilon_scope.startswith("record-level")
    assert (
        set(info.part_hashes) >= {MODEL_PART}
        and info.bundle_hash == servicer.current.bundle.content_hash
    )


def test_without_tls_the_service_does_not_answer(service):
    _, _, _, port = service
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RecommendServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            stub.Health(pb.HealthRequest(), timeout=5)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


def bad_requests(data):
    good = request_of(data, 0)
    events = list(good.history)
    return {
        "unknown items": (
            pb.RecommendRequest(
                history=[*events, pb.Event(item="no-such-film", timestamp=10**10)], k=5
            ),
            "unknown item",
        ),
        "empty history": (pb.RecommendRequest(history=[], k=5), "empty"),
        "10^5 events": (
            pb.RecommendRequest(history=[events[0]] * 100_000, k=5),
            f"at most {MAX_HISTORY}",
        ),
        "k = 0": (pb.RecommendRequest(history=events, k=0), "k must lie"),
        "k too large": (pb.RecommendRequest(history=events, k=10_000), "k must lie"),
        "time goes back": (
            pb.RecommendRequest(history=[*events, pb.Event(item=events[0].item, timestamp=0)], k=5),
            "not decrease",
        ),
        "time beyond 2^53": (
            pb.RecommendRequest(
                history=[*events, pb.Event(item=events[0].item, timestamp=2**60)], k=5
            ),
            "must lie in 0..",
        ),
        "unknown context": (
            pb.RecommendRequest(history=events, k=5, context={"gendre": "F"}),
            "did you mean 'gender'",
        ),
    }


BAD_CASES = (
    "unknown items",
    "empty history",
    "10^5 events",
    "k = 0",
    "k too large",
    "time goes back",
    "time beyond 2^53",
    "unknown context",
)


@pytest.mark.parametrize("case", BAD_CASES)
def test_each_bad_request_is_invalid_argument_and_the_server_keeps_serving(service, data, case):
    _, stub, _, _ = service
    request, message = bad_requests(data)[case]
    with pytest.raises(grpc.RpcError) as failure:
        stub.Recommend(request, timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in failure.value.details()
    assert len(stub.Recommend(request_of(data, 1), timeout=30).items) == 5


def test_recommend_many_answers_each_user_as_recommend_does(service, data):
    _, stub, _, _ = service
    users = [0, 5, 2, 9]
    requests = [request_of(data, u, k=3 + u % 4, gender="M") for u in users]
    many = stub.RecommendMany(pb.RecommendManyRequest(requests=requests), timeout=30)
    assert len(many.replies) == len(users)
    for request, reply in zip(requests, many.replies, strict=True):
        alone = stub.Recommend(request, timeout=30)
        assert [r.item for r in reply.items] == [r.item for r in alone.items]
        np.testing.assert_allclose(
            [r.score for r in reply.items], [r.score for r in alone.items], rtol=1e-5
        )
        assert len(reply.items) == request.k and reply.bundle_version == 1


@pytest.mark.parametrize("case", ["unknown items", "empty history", "k = 0"])
def test_one_bad_request_makes_recommend_many_invalid_naming_it(service, data, case):
    _, stub, _, _ = service
    request, message = bad_requests(data)[case]
    batch = pb.RecommendManyRequest(requests=[request_of(data, 1), request, request_of(data, 2)])
    with pytest.raises(grpc.RpcError) as failure:
        stub.RecommendMany(batch, timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        failure.value.details().startswith("requests[1]: ") and message in failure.value.details()
    )
    for wrong in ([], [request_of(data, 1)] * 1025):
        with pytest.raises(grpc.RpcError) as failure:
            stub.RecommendMany(pb.RecommendManyRequest(requests=wrong), timeout=30)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1..1024 requests" in failure.value.details()


def test_calls_of_many_users_batch_up_to_max_batch_users():
    release, sizes = threading.Event(), []

    class Echo:
        def recommend(self, histories, contexts):
            sizes.append(len(histories))
            release.wait(10)
            first = np.array([[h[0][0]] for h in histories])
            return FunnelResult(first, first * 1.0, first.astype(object), None)

    batcher, echo = Batcher(max_batch=8), Echo()
    answers: dict[int, list[int]] = {}

    def ask(call: int, users: list[int]) -> None:
        got = batcher.run(echo, [(np.array([u]), np.array([0])) for u in users], [{}] * len(users))
        answers[call] = [int(items[0]) for items, _, _ in got]

    calls = {0: [0], 1: [1, 2, 3], 2: list(range(4, 11)), 3: [11]}
    threads = [threading.Thread(target=ask, args=(c, u)) for c, u in calls.items()]
    threads[0].start()
    while not sizes:
        threading.Event().wait(0.01)
    for queued, thread in enumerate(threads[1:], start=1):
        thread.start()
        while batcher.queue.qsize() < queued:
            threading.Event().wait(0.005)
    release.set()
    for thread in threads:
        thread.join(10)
    assert answers == calls
    # 1 alone; 3 (the 7 after them would make 10 > 8: they open the next batch); 7 + 1.
    assert sizes == [1, 3, 8]


def test_a_bundle_swap_under_load_drops_no_request(tmp_path, data):
    with running_service(tmp_path, data, batched=False) as (servicer, stub, root, _):
        swap_under_load(servicer, stub, root, data)


def swap_under_load(servicer, stub, root: Path, data) -> None:
    watcher = BundleWatcher(root / "bundles", servicer, torch.device("cpu"), seconds=0.05)
    failures, versions, stop = [], [], threading.Event()

    def client(user: int) -> None:
        while not stop.is_set():
            try:
                versions.append(stub.Recommend(request_of(data, user), timeout=30).bundle_version)
            except grpc.RpcError as err:  # pragma: no cover - the assertion below reports it
                failures.append(err)

    threads = [threading.Thread(target=client, args=(u,)) for u in range(4)]
    for thread in threads:
        thread.start()
    write_bundle(root / "bundles" / "v2", data, version=2, seed=1)
    watcher.thread.start()
    deadline = threading.Event()
    for _ in range(200):
        if servicer.current.bundle.version == 2 and versions.count(2) > 8:
            break
        deadline.wait(0.05)
    stop.set()
    watcher.stop.set()
    for thread in threads:
        thread.join()
    assert not failures
    assert 1 in versions and 2 in versions and versions.count(2) > 8
    assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=10).bundle_version == 2


@pytest.mark.parametrize("method", ["calibrated", "long-tail"])
def test_a_bundle_that_asks_for_reranking_gets_it(tmp_path, data, method):
    write_bundle(tmp_path / "b", data, version=1, rerank=method)
    recommender = Recommender(load_serving_bundle(tmp_path / "b"), torch.device("cpu"))
    _, split = data
    histories = [(split.full(u)[0], split.full(u)[1].astype(np.int64)) for u in range(10)]
    result = recommender.recommend(histories, [{}] * 10)
    assert "rerank" in set(result.stages[:, :10].ravel())


def test_requests_that_wait_form_one_batch_and_each_gets_its_own_answer():
    release, sizes, threads = threading.Event(), [], set()

    class Echo:  # a recommender whose answer is each history's first item
        def recommend(self, histories, contexts):
            sizes.append(len(histories))
            threads.add((threading.get_ident(), torch.get_num_threads()))
            release.wait(10)  # the first batch holds the batcher while the rest queue
            first = np.array([[h[0][0]] for h in histories])
            return FunnelResult(first, first * 1.0, first.astype(object), None)

    batcher, echo, other = Batcher(max_batch=8, threads=1), Echo(), Echo()
    answers: dict[int, int] = {}

    def ask(n: int, recommender) -> None:
        ((items, _, _),) = batcher.run(recommender, [(np.array([n]), np.array([0]))], [{}])
        answers[n] = int(items[0])

    first = threading.Thread(target=ask, args=(0, echo))
    first.start()
    while not sizes:
        threading.Event().wait(0.01)
    rest = [threading.Thread(target=ask, args=(n, echo if n < 8 else other)) for n in range(1, 11)]
    for queued, thread in enumerate(rest, start=1):
        thread.start()
        while batcher.queue.qsize() < queued:  # queued in order 1, 2, ..., 10
            threading.Event().wait(0.005)
    release.set()
    for thread in [first, *rest]:
        thread.join(10)
    assert answers == {n: n for n in range(11)}
    # 1 alone, then 8 taken at once (split by recommender: 7 + 1), then the last 2
    assert sizes[0] == 1 and sum(sizes) == 11 and max(sizes[1:]) == 7 and len(sizes) == 4
    # One thread ran every batch, with the torch threads it was given.
    assert len(threads) == 1 and next(iter(threads))[1] == 1


def test_the_watcher_skips_bad_and_unfinished_bundles_and_keeps_serving(tmp_path, data):
    root = tmp_path / "bundles"
    write_bundle(root / "v1", data, version=1)
    servicer = RecommendServicer(Recommender(load_serving_bundle(root / "v1"), torch.device("cpu")))
    watcher = BundleWatcher(root, servicer, torch.device("cpu"), seconds=60)
    write_bundle(root / "v2", data, version=2)
    part = root / "v2" / MODEL_PART
    part.write_bytes(part.read_bytes()[:-1] + b"\1")  # corrupt
    write_bundle(root / ".v000003.partial", data, version=3)  # being published
    assert not watcher.check() and servicer.current.bundle.version == 1
    assert not watcher.check()  # a failed version is not reloaded at every poll
    write_bundle(root / "v4", data, version=4)
    assert watcher.check() and servicer.current.bundle.version == 4


def test_a_manifest_that_hashes_right_but_does_not_build_is_refused(tmp_path, data):
    write_bundle(tmp_path / "b", data, version=1)
    manifest = tmp_path / "b" / "serving.json"
    body = json.loads(manifest.read_text())
    del body["vocabularies"]
    body["content_hash"] = _manifest_hash(body)
    manifest.write_text(json.dumps(body))
    with pytest.raises(FedrecDataError, match="does not build"):
        load_serving_bundle(tmp_path / "b")


def test_a_call_keeps_nothing_of_its_histories(tmp_path, data):
    write_bundle(tmp_path / "b", data, version=1)
    recommender = Recommender(load_serving_bundle(tmp_path / "b"), torch.device("cpu"))
    _, split = data
    recommender.recommend([(split.full(0)[0], split.full(0)[1].astype(np.int64))], [{}])
    assert getattr(recommender.encoder._memo, "last", None) is None


def test_an_altered_or_unfinished_bundle_is_refused(tmp_path, data):
    write_bundle(tmp_path / "b", data, version=1)
    part = tmp_path / "b" / MODEL_PART
    part.write_bytes(part.read_bytes()[:-1] + b"\0")
    with pytest.raises(FedrecDataError, match="does not match its hash"):
        load_serving_bundle(tmp_path / "b")
    manifest = tmp_path / "b" / "serving.json"
    body = json.loads(manifest.read_text())
    body["privacy"]["client_max"] = 0.1  # under-reporting ε
    manifest.write_text(json.dumps(body))
    with pytest.raises(FedrecDataError, match="content_hash"):
        load_serving_bundle(tmp_path / "b")
    manifest.unlink()
    with pytest.raises(FedrecDataError, match="still being written"):
        load_serving_bundle(tmp_path / "b")


def test_the_checked_in_stubs_are_what_make_protos_makes(tmp_path):
    proto = Path("fedrec/serving/proto/recommend.proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(proto),
        ],
        cwd=REPO,
        check=True,
    )
    for name in ("recommend_pb2.py", "recommend_pb2_grpc.py", "recommend_pb2.pyi"):
        made = (tmp_path / proto.parent / name).read_text()
        assert made == (REPO / proto.parent / name).read_text(), f"{name}: run `make protos`"


def test_serve_refuses_to_start_without_tls_or_a_bundle(tmp_path):
    from typer.testing import CliRunner

    from fedrec.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--bundle", str(tmp_path)], prog_name="fedrec")
    assert result.exit_code == 2 and "--certs DIR is required" in result.output
    make_credentials(tmp_path / "certs", ["127.0.0.1"], [])
    result = runner.invoke(
        app, ["serve", "--bundle", str(tmp_path / "none"), "--certs", str(tmp_path / "certs")]
    )
    assert result.exit_code == 2 and "no serving bundle here" in result.output
    result = runner.invoke(
        app, ["serve", "--bundle", str(tmp_path), "--insecure", "--threads", "0"]
    )
    assert result.exit_code == 2 and "--threads must be >= 1" in result.output


@pytest.mark.slow
def test_fedrec_serve_answers_over_tls_and_swaps_in_a_new_bundle(tmp_path, data):
    write_bundle(tmp_path / "bundles" / "v1", data, version=1)
    certs = make_credentials(tmp_path / "certs", ["127.0.0.1"], [])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fedrec = Path(sys.executable).with_name("fedrec")
    server = subprocess.Popen(
        [str(fedrec), "serve", "--bundle", str(tmp_path / "bundles"), "--certs",
         str(tmp_path / "certs"), "--port", str(port), "--poll-seconds", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}", grpc.ssl_channel_credentials(certs.ca_cert.read_bytes())
        )
        grpc.channel_ready_future(channel).result(timeout=120)
        stub = pb_grpc.RecommendServiceStub(channel)
        assert stub.Health(pb.HealthRequest(), timeout=10).status == "SERVING"
        assert len(stub.Recommend(request_of(data, 2, k=4), timeout=30).items) == 4
        write_bundle(tmp_path / "bundles" / "v2", data, version=2, seed=3)
        for _ in range(100):
            if stub.ModelInfo(pb.ModelInfoRequest(), timeout=10).bundle_version == 2:
                break
            threading.Event().wait(0.1)
        assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=10).bundle_version == 2
        channel.close()
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert "serving bundle version 1" in output and "TLS" in output
    # Nothing from the requests reached the log: it holds the start and the swap, no more.
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and all("serving bundle version" in line for line in lines), lines


def semantic_bundle(folder: Path, data, codes: np.ndarray) -> GenerativeRetriever:
    """A bundle of HSTU, the semantic-ID model (untrained: any code is likely) and popularity;
    returns the semantic-ID model as it was written."""
    dataset, split = data
    torch.manual_seed(0)
    model = build_model("hstu", split.num_items, model_config("hstu", MODEL))
    catalogue = ItemCatalogue.from_dataset(
        dataset, popularity=split.train_item_counts(), codes=codes
    )
    vocabulary = CodeVocabulary(codes, codebook_size=8, extra_vocab=8)
    config = RetrievalConfig(
        max_items=6, embedding_dim=16, num_layers=1, num_heads=2, beam_width=10, top_k=10
    )
    retriever = GenerativeRetriever(
        build_retrieval_model(vocabulary, config).eval(), vocabulary, config
    )
    funnel = FunnelConfig(sources=("hstu", SEMANTIC_ID_SOURCE, "popularity"), retrieve_n=10)
    bundle = ModelBundle(
        1, "model: hstu\n", catalogue.to_text(), catalogue.content_hash, model.state_dict()
    )
    write_serving_bundle(folder, bundle, "hstu", MODEL, None, (), funnel, retriever=retriever)
    return retriever


def test_the_semantic_id_model_travels_in_the_bundle_and_serves_its_beams(tmp_path, data):
    _, split = data
    # 60 items, two levels of 8 codes: unique codes, each level used.
    codes = np.stack([np.arange(60) // 8, np.arange(60) % 8], axis=1)
    written = semantic_bundle(tmp_path / "b", data, codes)
    loaded = load_serving_bundle(tmp_path / "b")
    assert loaded.retriever is not None and "retrieval.safetensors" in loaded.part_hashes
    before, after = written.model.state_dict(), loaded.retriever.model.state_dict()
    assert before.keys() == after.keys()  # the tied output layer is rebuilt, not stored
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)
    np.testing.assert_array_equal(loaded.retriever.vocabulary.tokens, written.vocabulary.tokens)

    # The service's semantic-ID candidates are the written model's beams, seen items dropped.
    recommender = Recommender(loaded, torch.device("cpu"))
    users = np.arange(4)
    visible = split.visible("test")
    histories = [(visible.full(int(u))[0], visible.full(int(u))[1].astype(np.int64)) for u in users]
    result = recommender.recommend(histories, [{}] * len(users))
    expected, _ = generative_source(written.model, written.vocabulary, written.config, 10)(
        visible, users
    )
    for row in range(len(users)):
        got = result.candidates.items[row][result.candidates.found[row, :, 1]]
        assert set(got.tolist()) == set(expected[row][expected[row] >= 0].tolist())
        assert not set(got.tolist()) & set(histories[row][0].tolist())
    assert (result.candidates.source == 1).any()  # some only the semantic-ID model proposed


def test_a_semantic_id_model_that_does_not_fit_its_bundle_is_refused(tmp_path, data):
    codes = np.stack([np.arange(60) // 8, np.arange(60) % 8], axis=1)
    retriever = semantic_bundle(tmp_path / "ok", data, codes)
    catalogue = ItemCatalogue.from_dataset(data[0], codes=codes[::-1].copy())
    bundle = ModelBundle(1, "", catalogue.to_text(), catalogue.content_hash, {})
    with pytest.raises(ValueError, match="not the catalogue's codes"):
        write_serving_bundle(
            tmp_path / "bad", bundle, "hstu", MODEL, None, (), FunnelConfig(), retriever=retriever
        )
    assert not (tmp_path / "bad").exists()
    # A manifest whose semantic-ID settings do not fit the stored tensors (re-hashed, as a
    # bundle written by another version would be) does not build.
    manifest = json.loads((tmp_path / "ok" / MANIFEST).read_text("utf-8"))
    manifest["semantic_id"]["retrieval"]["embedding_dim"] = 32
    manifest["content_hash"] = _manifest_hash(manifest)
    (tmp_path / "ok" / MANIFEST).write_text(json.dumps(manifest), "utf-8")
    with pytest.raises(FedrecDataError, match="does not build"):
        load_serving_bundle(tmp_path / "ok")
