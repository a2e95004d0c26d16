"""Load test of `fedrec serve` on 127.0.0.1 with TLS (issue 18), bounded: every client stops
by itself after --seconds.

    python simulations/load_test.py --bundle runs/funnel-bundle --run runs/ml-100k-hstu

- starts `fedrec serve` in its own process, on a copy of the bundle, with certificates made
  for 127.0.0.1 in a temporary folder;
- 1, 8 and 64 concurrent clients (threads of this process), each sending the heaviest user's
  history (the longest in the run's data) again and again: p50 / p99 latency per request and
  requests per second;
- a bundle swap under load: while 8 clients run, a new bundle version is published into the
  served folder; every reply must succeed, and replies must move to the new version;
- RecommendMany: every user's test history, --batch users a call, from --many-clients
  concurrent clients: users per second through the service;
- batched inference in process (no gRPC): users per second with --batch users per call, over
  every user's test history (the median of --repeats passes after one to warm up).

Timing is of this shared machine: medians of a run, not a pass/fail figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedrec.data import prepare_split  # noqa: E402
from fedrec.privacy_audit import run_config  # noqa: E402
from fedrec.serving.bundle import ModelBundle  # noqa: E402
from fedrec.serving.proto import recommend_pb2 as pb  # noqa: E402
from fedrec.serving.proto import recommend_pb2_grpc as pb_grpc  # noqa: E402
from fedrec.serving.service import Recommender  # noqa: E402
from fedrec.serving.store import (  # noqa: E402
    MANIFEST,
    MODEL_PART,
    load_serving_bundle,
    write_serving_bundle,
)
from server.certs import make_credentials  # noqa: E402


def republish(source: Path, target: Path, version: int) -> None:
    """``source``'s bundle again as ``version`` (what the next round's bundle looks like to the
    service: new hashes, new version)."""
    bundle = load_serving_bundle(source)
    manifest = json.loads((source / MANIFEST).read_text("utf-8"))
    model = ModelBundle.from_bytes((source / MODEL_PART).read_bytes(), source / MODEL_PART)
    assert bundle.ranker is not None
    write_serving_bundle(
        target,
        dataclasses.replace(model, version=version),
        manifest["model"]["name"],
        manifest["model"]["options"],
        bundle.ranker,
        bundle.tables.vocabularies,
        bundle.funnel,
        bundle.privacy,
        retriever=bundle.retriever,
    )


def clients(
    stub: Any, requests: list[Any], count: int, seconds: float, many: bool = False
) -> dict[str, Any]:
    """``count`` client threads, each sending ``requests`` in turn (RecommendMany calls when
    ``many``) until ``seconds`` have passed."""
    latencies: list[float] = []
    versions: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def run() -> None:
        mine: list[float] = []
        seen: list[int] = []
        while time.perf_counter() < deadline:
            request = requests[len(mine) % len(requests)]
            start = time.perf_counter()
            try:
                if many:
                    reply = stub.RecommendMany(request, timeout=60).replies[0]
                else:
                    reply = stub.Recommend(request, timeout=30)
            except grpc.RpcError as err:
                with lock:
                    failures.append(f"{err.code()}: {err.details()}")
                continue
            mine.append(time.perf_counter() - start)
            seen.append(reply.bundle_version)
        with lock:
            latencies.extend(mine)
            versions.extend(seen)

    threads = [threading.Thread(target=run) for _ in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    users = len(requests[0].requests) if many else 1
    return {
        "clients": count,
        "users_per_call": users,
        "requests": len(latencies),
        "failures": failures[:5],
        "failed": len(failures),
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "requests_per_s": len(latencies) / wall,
        "users_per_s": len(latencies) * users / wall,
        "versions": sorted(set(versions)),
    }


def many_requests(dataset: Any, split: Any, batch: int) -> list[Any]:
    """Every user's test history (no context), ``batch`` users to a RecommendMany call."""
    visible, raw = split.visible("test"), dataset.raw_item_ids
    requests = []
    for user in range(split.num_users):
        items, times = visible.full(user)
        pairs = zip(items.tolist(), times.tolist(), strict=True)
        history = [pb.Event(item=str(raw[i]), timestamp=int(t)) for i, t in pairs]
        requests.append(pb.RecommendRequest(history=history, k=10))
    return [
        pb.RecommendManyRequest(requests=requests[lo : lo + batch])
        for lo in range(0, len(requests), batch)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True, help="a serving bundle folder")
    parser.add_argument("--run", type=Path, required=True, help="the run whose data to replay")
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument(
        "--batch", type=int, default=256, help="users per batched call (in process and over gRPC)"
    )
    parser.add_argument(
        "--many-clients",
        type=int,
        nargs="+",
        default=[1, 2],
        help="concurrent clients of RecommendMany (--batch users a call)",
    )
    parser.add_argument("--port", type=int, default=50071)
    parser.add_argument(
        "--max-batch", type=int, default=64, help="the server's --max-batch (1: no batching)"
    )
    parser.add_argument("--threads", type=int, default=1, help="the server's --threads")
    parser.add_argument("--repeats", type=int, default=5, help="passes of the batched test")
    parser.add_argument("--output", type=Path, help="write the report here (JSON)")
    args = parser.parse_args()

    config = run_config(args.run)
    dataset, split = prepare_split(config.data)
    lengths = np.diff(split.offsets)
    heavy = int(lengths.argmax())
    items, times = split.full(heavy)
    raw = dataset.raw_item_ids
    request = pb.RecommendRequest(
        history=[
            pb.Event(item=str(raw[i]), timestamp=int(t)) for i, t in zip(items, times, strict=True)
        ],
        context={"age": "30", "gender": "M", "occupation": "engineer"},
        k=10,
    )
    report: dict[str, Any] = {
        "heavy_user_events": int(lengths.max()),
        "max_batch": args.max_batch,
        "threads": args.threads,
        "levels": [],
    }

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        certs = make_credentials(root / "certs", ["127.0.0.1"], [])
        shutil.copytree(args.bundle, root / "bundles" / "v0000")
        bundle = load_serving_bundle(root / "bundles" / "v0000")
        report["candidates"] = bundle.funnel.retrieve_n * len(bundle.funnel.sources)
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
        server = subprocess.Popen(
            [
                sys.executable, "-m", "fedrec.cli", "serve",
                "--bundle", str(root / "bundles"),
                "--certs", str(root / "certs"),
                "--port", str(args.port),
                "--device", "cpu",
                "--poll-seconds", "0.5",
                "--workers", str(max(args.concurrency)),
                "--max-batch", str(args.max_batch),
                "--threads", str(args.threads),
            ],
            env=env,
        )  # fmt: skip
        try:
            channel = grpc.secure_channel(
                f"127.0.0.1:{args.port}", grpc.ssl_channel_credentials(certs.ca_cert.read_bytes())
            )
            grpc.channel_ready_future(channel).result(timeout=120)
            stub = pb_grpc.RecommendServiceStub(channel)
            stub.Recommend(request, timeout=60)  # warm up
            for count in args.concurrency:
                level = clients(stub, [request], count, args.seconds)
                report["levels"].append(level)
                print(json.dumps(level), flush=True)
            # The swap: a new version appears in the served folder while 8 clients run.
            timer = threading.Timer(
                args.seconds / 3,
                republish,
                (root / "bundles" / "v0000", root / "bundles" / "v0001", bundle.version + 1),
            )
            timer.start()
            swap = clients(stub, [request], 8, args.seconds)
            timer.join()
            swap["moved"] = bundle.version + 1 in swap["versions"]
            report["swap"] = swap
            print(json.dumps({"swap": swap}), flush=True)
            if not swap["moved"]:
                raise SystemExit("the swap did not happen: no reply came from the new bundle")
            report["many"] = []
            for count in args.many_clients:
                level = clients(
                    stub, many_requests(dataset, split, args.batch), count, args.seconds, True
                )
                report["many"].append(level)
                print(json.dumps({"many": level}), flush=True)
            channel.close()
        finally:
            server.terminate()
            server.wait(timeout=30)

    torch.set_num_threads(2)
    recommender = Recommender(bundle, torch.device("cpu"))
    visible = split.visible("test")
    users = np.arange(split.num_users)
    contexts: list[dict[str, str]] = [{} for _ in users]
    histories = [(visible.full(int(u))[0], visible.full(int(u))[1].astype(np.int64)) for u in users]
    passes = []
    for _ in range(args.repeats + 1):  # the first pass warms up and is not counted
        started = time.perf_counter()
        for lo in range(0, len(users), args.batch):
            recommender.recommend(histories[lo : lo + args.batch], contexts[lo : lo + args.batch])
        passes.append(len(users) / (time.perf_counter() - started))
    report["batched"] = {
        "users": len(users),
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "users_per_s_each_pass": passes[1:],
        "users_per_s": float(np.median(passes[1:])),
    }
    print(json.dumps({"batched": report["batched"]}), flush=True)
    if args.output:
        args.output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
