"""``RecommendService`` over gRPC: the funnel of the newest serving bundle, behind TLS.

- Every request is validated before any model runs; a bad one is ``INVALID_ARGUMENT`` with a
  message naming what to fix, and never reaches the funnel.
- The service stores nothing from requests: a history lives in the handler's locals for the
  length of the call, and nothing about it is logged.
- Bundles are swapped atomically: a request reads the current ``Recommender`` once, at its
  start, and finishes on it; a new bundle is loaded and verified aside, then published by one
  reference assignment. No request sees a half-loaded bundle or is dropped by a swap.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from fedrec.data.split import SequenceSplit
from fedrec.errors import FedrecDataError
from fedrec.serving.bundle import ModelBundle
from fedrec.serving.features import USER_ATTRIBUTES
from fedrec.serving.funnel import Funnel, FunnelConfig, FunnelResult, Source, audit_reranker
from fedrec.serving.proto import recommend_pb2 as pb
from fedrec.serving.proto import recommend_pb2_grpc as pb_grpc
from fedrec.serving.ranker import ranker_scorer, sequential_user_vectors
from fedrec.serving.sources import LLM_SOURCE
from fedrec.serving.store import MANIFEST, ServingBundle, bundle_sources, load_serving_bundle

log = logging.getLogger(__name__)

# About 4x the longest ML-1M history (2,314): longer is a broken client or an attack on
# latency. Timestamps beyond 2^53 would not survive the float64 the models read them as.
MAX_HISTORY = 10_000
MAX_TIMESTAMP = 2**53
MAX_REQUESTS = 1_024  # users in one RecommendMany call

# One user's answer: (items, scores, stages), each the funnel's widest row.
Answer = tuple[np.ndarray, np.ndarray, np.ndarray]
# A parsed request: (items, timestamps, context, k).
Parsed = tuple[np.ndarray, np.ndarray, dict[str, str], int]


class BadRequest(ValueError):
    """A request the service refuses (gRPC INVALID_ARGUMENT)."""


# Builds the ``llm`` source of a bundle's LLM federation round on a device, ``n`` items a user
# (``fedrec.recommend.foundation_llm_source``: it needs the foundation's folder).
LLMSourceBuilder = Callable[[ModelBundle, torch.device, int], Source]


class Recommender:
    """One bundle's funnel on one device (CUDA or CPU), answering batches of users."""

    def __init__(
        self,
        bundle: ServingBundle,
        device: torch.device,
        llm_builder: LLMSourceBuilder | None = None,
    ):
        self.bundle, self.device = bundle, device
        config = bundle.funnel
        self.encoder, sources = bundle_sources(bundle, device, config.retrieve_n)
        if bundle.llm is not None and LLM_SOURCE in config.sources:
            if llm_builder is None:
                raise FedrecDataError(
                    "the bundle's funnel has the llm source: serve it with --foundation DIR (a "
                    "copy of the LLM federation's foundation folder)",
                    MANIFEST,
                )
            sources[LLM_SOURCE] = llm_builder(bundle.llm, device, config.retrieve_n)
        # The funnel always keeps its widest list; a request's k cuts it.
        self.max_k = config.retrieve_n
        widest = FunnelConfig(**{**vars(config), "k": self.max_k})
        scorer = None
        if bundle.ranker is not None:
            scorer = ranker_scorer(
                copy.deepcopy(bundle.ranker).to(device),
                bundle.tables,
                sequential_user_vectors(self.encoder),
            )
        tasks = bundle.ranker.config.tasks if bundle.ranker is not None else ()
        try:
            # The re-ranker orders the bundle's first k; the rest follows in fused order.
            reranker = audit_reranker(config, bundle.catalogue) if config.rerank else None
            self.funnel = Funnel(widest, sources, scorer, tasks, reranker)
        except ValueError as err:
            raise FedrecDataError(f"the bundle's funnel cannot run: {err}", MANIFEST) from None
        self.index = bundle.catalogue.index
        self.titles = bundle.catalogue.item_features.get("title", ())

    def parse(self, request: Any) -> Parsed:
        """(items, timestamps, context, k) of a request, or ``BadRequest`` saying why not."""
        if not 1 <= request.k <= self.max_k:
            raise BadRequest(f"k must lie in 1..{self.max_k}, got {request.k}")
        if not request.history:
            raise BadRequest(
                "history is empty: send the user's events (oldest first); a user with none "
                "has nothing to personalise"
            )
        if len(request.history) > MAX_HISTORY:
            raise BadRequest(
                f"history has {len(request.history)} events, at most {MAX_HISTORY} are "
                "accepted: send the most recent ones"
            )
        events = [(event.item, event.timestamp) for event in request.history]  # one pass
        items = np.array([self.index.get(item, -1) for item, _ in events], dtype=np.int64)
        if (items < 0).any():
            unknown = sorted({events[i][0] for i in np.flatnonzero(items < 0).tolist()})
            shown = ", ".join(repr(u) for u in unknown[:5])
            raise BadRequest(
                f"{len(unknown)} unknown item(s) in history: {shown} (ids of catalogue "
                f"{self.bundle.catalogue.content_hash[:12]})"
            )
        times = np.array([stamp for _, stamp in events], dtype=np.int64)
        if (times < 0).any() or (times > MAX_TIMESTAMP).any() or (np.diff(times) < 0).any():
            raise BadRequest(
                f"history timestamps must lie in 0..{MAX_TIMESTAMP} (seconds) and not decrease "
                "(oldest first)"
            )
        context = dict(request.context)
        for key in context:
            if key not in USER_ATTRIBUTES:
                close = difflib.get_close_matches(key, USER_ATTRIBUTES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise BadRequest(
                    f"unknown context key {key!r}{hint}; known: {', '.join(USER_ATTRIBUTES)}"
                )
        return items, times, context, int(request.k)

    def recommend(
        self,
        histories: Sequence[tuple[np.ndarray, np.ndarray]],
        contexts: Sequence[Mapping[str, str]],
    ) -> FunnelResult:
        """The funnel's widest list for each (items, timestamps) history."""
        lengths = np.array([len(items) for items, _ in histories], dtype=np.int64)
        visible = SequenceSplit(
            num_users=len(histories),
            num_items=self.bundle.catalogue.num_items,
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            items=np.concatenate([items for items, _ in histories]),
            timestamps=np.concatenate([times for _, times in histories]).astype(np.float64),
        )
        attributes = self.bundle.tables.attributes(contexts)
        try:
            return self.funnel(visible, np.arange(len(histories)), attributes)
        finally:
            self.encoder.forget()  # the service keeps nothing of a request past its call


def answers_of(result: FunnelResult) -> list[Answer]:
    return [(result.items[r], result.scores[r], result.stages[r]) for r in range(len(result.items))]


@dataclass
class _Pending:
    recommender: Recommender
    histories: list[tuple[np.ndarray, np.ndarray]]
    contexts: list[dict[str, str]]
    done: threading.Event = field(default_factory=threading.Event)
    answers: list[Answer] = field(default_factory=list)
    error: BaseException | None = None


class Batcher:
    """Runs the funnel for concurrent requests as batches, on one thread: requests that
    arrive while a batch runs form the next one (up to ``max_batch`` users; a call with more
    users runs alone). There is no timer, so a request alone runs at once; under load the
    model's cost is shared (one encoder pass, one ranker pass per batch) and the models never
    run on many threads at once, which on a few cores only makes every request slower.
    Requests validated against different bundles (a swap between them) run in separate
    batches."""

    def __init__(self, max_batch: int = 64, threads: int = 1):
        self.max_batch, self.threads = max_batch, threads
        self.queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self.batches = 0
        self._carried: _Pending | None = None  # taken from the queue, too big for the batch
        threading.Thread(target=self._loop, name="funnel-batcher", daemon=True).start()

    def run(
        self,
        recommender: Recommender,
        histories: list[tuple[np.ndarray, np.ndarray]],
        contexts: list[dict[str, str]],
    ) -> list[Answer]:
        pending = _Pending(recommender, histories, contexts)
        self.queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.answers

    def _next_batch(self) -> list[_Pending]:
        batch = [self._carried or self.queue.get()]
        self._carried = None
        users = len(batch[0].histories)
        while users < self.max_batch:
            try:
                pending = self.queue.get_nowait()
            except queue.Empty:
                break
            if users + len(pending.histories) > self.max_batch:
                self._carried = pending  # first in the next batch
                break
            batch.append(pending)
            users += len(pending.histories)
        return batch

    def _loop(self) -> None:
        # Per thread (OpenMP): the model thread's own intra-op threads. Two on this
        # thread made a lone request 2x slower than one (BENCHMARKS.md, issue 18).
        torch.set_num_threads(self.threads)
        while True:
            batch = self._next_batch()
            for recommender in {id(p.recommender): p.recommender for p in batch}.values():
                group = [p for p in batch if p.recommender is recommender]
                self.batches += 1
                try:
                    answers = answers_of(
                        recommender.recommend(
                            [h for p in group for h in p.histories],
                            [c for p in group for c in p.contexts],
                        )
                    )
                    for pending in group:
                        pending.answers = answers[: len(pending.histories)]
                        answers = answers[len(pending.histories) :]
                except Exception as err:  # the callers raise it; the loop goes on
                    for pending in group:
                        pending.error = err
                finally:
                    for pending in group:
                        pending.done.set()


class RecommendServicer(pb_grpc.RecommendServiceServicer):
    def __init__(self, recommender: Recommender, batcher: Batcher | None = None):
        self.current = recommender
        self.batcher = batcher

    def swap(self, recommender: Recommender) -> None:
        """Publish a new bundle's recommender (one assignment: requests in flight finish on
        the old one)."""
        self.current = recommender

    def Recommend(self, request: Any, context: grpc.ServicerContext) -> Any:
        recommender = self.current  # read once: a swap mid-request does not affect it
        try:
            parsed = recommender.parse(request)
        except BadRequest as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return self._reply(recommender, parsed[3], self._answers(recommender, [parsed])[0])

    def RecommendMany(self, request: Any, context: grpc.ServicerContext) -> Any:
        recommender = self.current
        if not 1 <= len(request.requests) <= MAX_REQUESTS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"send 1..{MAX_REQUESTS} requests per call, got {len(request.requests)}",
            )
        parsed = []
        for index, one in enumerate(request.requests):
            try:
                parsed.append(recommender.parse(one))
            except BadRequest as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"requests[{index}]: {err}")
        answers = self._answers(recommender, parsed)
        return pb.RecommendManyReply(
            replies=[
                self._reply(recommender, k, answer)
                for (_, _, _, k), answer in zip(parsed, answers, strict=True)
            ]
        )

    def _answers(self, recommender: Recommender, parsed: list[Parsed]) -> list[Answer]:
        histories = [(items, times) for items, times, _, _ in parsed]
        contexts = [user for _, _, user, _ in parsed]
        if self.batcher is not None:
            return self.batcher.run(recommender, histories, contexts)
        return answers_of(recommender.recommend(histories, contexts))

    @staticmethod
    def _reply(recommender: Recommender, k: int, answer: Answer) -> Any:
        ranked, scores, stages = answer
        raw = recommender.bundle.catalogue.raw_item_ids
        titles = recommender.titles
        reply = pb.RecommendReply(
            bundle_version=recommender.bundle.version, bundle_hash=recommender.bundle.content_hash
        )
        for item, score, stage in zip(
            ranked[:k].tolist(), scores[:k].tolist(), stages[:k], strict=True
        ):
            if item >= 0:
                reply.items.add(
                    item=raw[item],
                    score=score,
                    stage=str(stage),
                    title=titles[item] if titles else "",
                )
        return reply

    def Health(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.HealthReply(status="SERVING")

    def ModelInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        bundle = self.current.bundle
        epsilon, delta, scope = bundle.epsilon
        return pb.ModelInfoReply(
            bundle_version=bundle.version,
            bundle_hash=bundle.content_hash,
            epsilon=epsilon,
            delta=delta,
            epsilon_scope=scope,
            stages=[
                *bundle.funnel.sources,
                *(["ranker"] if bundle.funnel.rank else []),
                *(["rerank"] if bundle.funnel.rerank else []),
            ],
            part_hashes=bundle.part_hashes,
        )


def newest_bundle(folder: Path) -> Path:
    """``folder`` itself if it is a serving bundle, else its sub-folder of the highest version
    whose manifest exists (bundles being written have none yet)."""
    if (folder / MANIFEST).exists():
        return folder
    # Only v<round> folders: one being published is written aside (a dot-named folder).
    found = (
        sorted(
            (p for p in folder.glob("v[0-9]*") if p.is_dir() and (p / MANIFEST).exists()),
            key=_version,
        )
        if folder.is_dir()
        else []
    )
    if not found:
        raise FedrecDataError(
            f"no serving bundle here (no {MANIFEST} in it or its folders)", folder
        )
    return found[-1]


def _version(bundle: Path) -> int:
    try:
        return int(json.loads((bundle / MANIFEST).read_text("utf-8"))["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


class BundleWatcher:
    """Polls a folder of bundles and swaps in a newer verified one; a bundle that fails to
    load is logged and skipped (the service keeps serving the one it has)."""

    def __init__(
        self,
        folder: Path,
        servicer: RecommendServicer,
        device: torch.device,
        seconds: float,
        llm_builder: LLMSourceBuilder | None = None,
    ):
        self.folder, self.servicer, self.device, self.seconds = folder, servicer, device, seconds
        self.llm_builder = llm_builder
        self.stop = threading.Event()
        self.failed = -1  # the newest version that failed to load
        self.thread = threading.Thread(target=self._run, name="bundle-watcher", daemon=True)

    def check(self) -> bool:
        """Swap in the newest bundle if it is newer; True if it did. A bundle that fails to
        load or build is logged once and skipped until a newer one appears."""
        path = newest_bundle(self.folder)
        version = _version(path)
        if version <= max(self.servicer.current.bundle.version, self.failed):
            return False
        try:
            recommender = Recommender(load_serving_bundle(path), self.device, self.llm_builder)
        except Exception as err:  # whatever it is, keep serving the current one
            self.failed = version
            log.error("bundle %s not swapped in (%s): %s", path, type(err).__name__, err)
            return False
        self.servicer.swap(recommender)
        log.info("serving bundle version %d (%s)", recommender.bundle.version, path)
        return True

    def _run(self) -> None:
        while not self.stop.wait(self.seconds):
            try:
                self.check()
            except Exception as err:  # the watcher must outlive any one poll
                log.error("bundle watcher: %s: %s", type(err).__name__, err)


def serve(
    servicer: RecommendServicer,
    address: str,
    certificate: bytes | None,
    key: bytes | None,
    workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Start the service on ``address`` (``host:port``, port 0: any free one); TLS unless
    ``certificate`` is None (tests of the insecure path only). Returns the server and port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_RecommendServiceServicer_to_server(servicer, server)
    if certificate is None or key is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, certificate)]))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port


def device_for(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this machine has no CUDA device: use cpu or auto")
    return device


def epsilon_text(bundle: ServingBundle) -> str:
    epsilon, delta, scope = bundle.epsilon
    return scope if math.isinf(epsilon) else f"{epsilon:.3g} (δ {delta:.1e}), {scope}"
