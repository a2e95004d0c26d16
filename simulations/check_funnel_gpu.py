"""Run the serving funnel on a GPU and hold it to the CPU path (issue 18):

    python simulations/check_funnel_gpu.py --bundle runs/funnel-bundle --run runs/ml-100k-hstu

Every user's test history goes through the bundle's funnel on CUDA and on the CPU; the check
passes when both return the same items (up to swaps of items whose scores tie within
--tolerance) and prints users per second on each. Without --bundle/--run it builds a small
bundle from the synthetic generator. On a machine without CUDA it says so and exits with
status 2: nothing was checked. (`--device cpu` runs the same comparison CPU against CPU, to
try the script itself.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedrec.data import SyntheticConfig, generate_synthetic, leave_one_out, prepare_split  # noqa: E402
from fedrec.data.catalogue import ItemCatalogue  # noqa: E402
from fedrec.data.split import SequenceSplit  # noqa: E402
from fedrec.models.ranking import ranker_class  # noqa: E402
from fedrec.models.registry import build_model, model_config  # noqa: E402
from fedrec.privacy_audit import run_config  # noqa: E402
from fedrec.serving.bundle import ModelBundle  # noqa: E402
from fedrec.serving.features import USER_ATTRIBUTES, FeatureTables  # noqa: E402
from fedrec.serving.funnel import FunnelConfig, FunnelResult  # noqa: E402
from fedrec.serving.service import Recommender  # noqa: E402
from fedrec.serving.store import load_serving_bundle, write_serving_bundle  # noqa: E402


def synthetic_bundle(folder: Path) -> SequenceSplit:
    """A small HSTU + ranker bundle over synthetic data (random weights: the check compares
    devices, not accuracy)."""
    dataset = generate_synthetic(SyntheticConfig(num_users=500, num_items=400, seed=1))
    split = leave_one_out(dataset)
    options = dict(max_len=50, embedding_dim=32, num_blocks=2, num_heads=2, dropout=0.0)
    torch.manual_seed(0)
    model = build_model("hstu", split.num_items, model_config("hstu", options))
    catalogue = ItemCatalogue.from_dataset(dataset, popularity=split.train_item_counts())
    users = {a: dataset.user_features.get(a, np.array([])).tolist() for a in USER_ATTRIBUTES}
    tables = FeatureTables.build(catalogue, users)
    ranker = ranker_class("mmoe-dcn")(tables.ranker_config(32, 2))
    bundle = ModelBundle(0, "", catalogue.to_text(), catalogue.content_hash, model.state_dict())
    funnel = FunnelConfig(sources=("hstu", "popularity"), retrieve_n=100, rank=True)
    write_serving_bundle(folder, bundle, "hstu", options, ranker, tables.vocabularies, funnel)
    return split


def timed(recommender: Recommender, histories: list, batch: int) -> tuple[FunnelResult, float]:
    results = []
    started = time.perf_counter()
    for lo in range(0, len(histories), batch):
        part = histories[lo : lo + batch]
        results.append(recommender.recommend(part, [{}] * len(part)))
    if recommender.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    width = max(r.items.shape[1] for r in results)  # a batch with fewer candidates is narrower

    def padded(arrays: list[np.ndarray], fill: object) -> np.ndarray:
        return np.concatenate(
            [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in arrays]
        )

    merged = FunnelResult(
        padded([r.items for r in results], -1),
        padded([r.scores for r in results], -np.inf),
        padded([r.stages for r in results], ""),
        results[0].candidates,
    )
    return merged, seconds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, help="a serving bundle (with --run)")
    parser.add_argument("--run", type=Path, help="the run whose users' histories to replay")
    parser.add_argument("--device", default="cuda", help="the accelerator to check (cuda)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device on this machine: the GPU check did not run (the CPU path is tested")
        print("by tests/test_funnel.py and tests/test_service.py)")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is None:
            split = synthetic_bundle(Path(tmp) / "bundle")
            bundle = load_serving_bundle(Path(tmp) / "bundle")
        else:
            if args.run is None:
                parser.error("--bundle needs --run (the data whose histories to replay)")
            bundle = load_serving_bundle(args.bundle)
            split = prepare_split(run_config(args.run).data)[1]
    visible = split.visible("test")
    histories = [
        (visible.full(u)[0], visible.full(u)[1].astype(np.int64)) for u in range(split.num_users)
    ]
    cpu_result, cpu_seconds = timed(Recommender(bundle, torch.device("cpu")), histories, args.batch)
    device = torch.device(args.device)
    accelerated = Recommender(bundle, device)
    timed(accelerated, histories[: args.batch], args.batch)  # warm-up (kernels, allocator)
    result, seconds = timed(accelerated, histories, args.batch)
    same = result.items == cpu_result.items
    # A difference counts only where the two scores differ: tied items may swap places.
    tied = np.isclose(result.scores, cpu_result.scores, atol=args.tolerance, rtol=args.tolerance)
    mismatched = int((~same & ~tied).sum())
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "users": len(histories),
        "identical_slots": float(same.mean()),
        "mismatched_slots": mismatched,
        "max_score_difference": float(
            np.nanmax(np.abs(np.where(same, result.scores - cpu_result.scores, 0.0)))
        ),
        "cpu_users_per_s": len(histories) / cpu_seconds,
        "device_users_per_s": len(histories) / seconds,
    }
    print(json.dumps(report, indent=1))
    return 0 if mismatched == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
