"""Teacher lists (``train.distill.teacher``) from a finished HSTU/SASRec run: its best model's
top-K after every user's training history. The control of a distillation benchmark: a student
taught by a teacher as good as itself (self-distillation) shows what the loss does apart from
the teacher's quality. (The LLM recommender's lists: ``bench_llm.py teacher``.)

    python simulations/teacher_lists.py --run runs/ml-100k-hstu --lists runs/teacher-hstu.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from fedrec.data import prepare_split
from fedrec.distillation import teacher_lists
from fedrec.privacy_audit import load_model, run_config
from fedrec.training import model_scorer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="finished HSTU/SASRec run folder")
    parser.add_argument("--lists", type=Path, required=True, help="where the lists go (.npz)")
    parser.add_argument("--top-k", type=int, default=20, help="items per list")
    args = parser.parse_args(argv)
    config = run_config(args.run)
    _, split = prepare_split(config.data)
    model = load_model(args.run, config, split.num_items)
    scorer = model_scorer(model, split, torch.device("cpu"))
    source = f"{config.model_name} run {args.run}"
    teacher_lists(scorer, split, args.top_k, source).save(args.lists)
    print(f"{args.lists}: top {args.top_k} of {source} for {split.num_users} users")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
