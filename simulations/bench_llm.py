"""Benchmarks of the LLM recommender, each measured side by side in one run:

    python simulations/bench_llm.py bytes --config configs/ml-100k-llm.yaml
        bytes a client uploads per round (its ArrayRecord) vs the full model
    python simulations/bench_llm.py dp-step --config configs/ml-100k-llm.yaml --repeats 5
        seconds per local step: plain vs Opacus DP-SGD (hooks, functorch, ghost), medians and
        ratios
    python simulations/bench_llm.py personal --run runs/llm-ml100k
        test NDCG@10 / HR@10 of the users with a personal prompt: with it vs the initial one,
        and the paired per-user difference with a 95 % bootstrap interval
    python simulations/bench_llm.py final --run runs/ml-100k-smollm2 --baseline runs/ml-100k-hstu
        test metrics of a finished run's global adapters on the users its rounds were evaluated
        on (evaluation.sample_users), with every history and cut to the last --few-shot events,
        next to popularity and the --baseline runs (HSTU/SASRec) on the same users and cuts
    python simulations/bench_llm.py centralized --config configs/ml-100k-llm.yaml --epochs 10
        the same adapters trained on every user's windows in one place (the reference the
        federation is compared with), and the foundation alone (epochs 0)
    python simulations/bench_llm.py teacher --config configs/ml-100k-llm-lora16.yaml --epochs 5 \
            --lists runs/teacher-llm-lora16.npz
        centralized, then the trained model's ranked lists after every user's training history:
        the teacher of a distilled student (train.distill, configs/ml-100k-hstu-distill.yaml)

The foundation of the config must exist (`fedrec foundation -c CONFIG`).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedrec.audits.metrics import paired_difference  # noqa: E402
from fedrec.config import load_config  # noqa: E402
from fedrec.distillation import teacher_lists  # noqa: E402
from fedrec.evaluation import (  # noqa: E402
    EvalConfig,
    evaluate,
    evaluation_users,
    popularity_scorer,
)
from fedrec.evaluation.evaluator import Scorer  # noqa: E402
from fedrec.federated_models import build_federated_model  # noqa: E402
from fedrec.federation.layout import client_paths  # noqa: E402
from fedrec.federation.model import PersonalFile  # noqa: E402
from fedrec.llm_rec.federated import LLMFederatedModel  # noqa: E402
from fedrec.llm_rec.model import example_losses  # noqa: E402
from fedrec.population import Population, load_population  # noqa: E402
from fedrec.privacy.dp_sgd import DPSGDConfig, dp_train  # noqa: E402
from fedrec.privacy_audit import load_model, run_config  # noqa: E402
from fedrec.recommend import global_model, load_run  # noqa: E402
from fedrec.training import model_scorer, trainable_users  # noqa: E402


def _model(population: Population, run_dir: Path) -> LLMFederatedModel:
    # The server's start of a run: the foundation stage and the catalogue it publishes.
    model = build_federated_model(population.config, population.publish(run_dir), run_dir)
    assert isinstance(model, LLMFederatedModel), "the config has no llm section"
    return model


def _record_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors as Flower serialises them into a message."""
    return sum(len(array.data) for array in ArrayRecord(state).values())


def bench_bytes(population: Population) -> dict[str, Any]:
    wrapper = _model(population, Path(population.config.output_dir))
    model = wrapper.model
    shared = model.shared_state()
    full = {k: v for k, v in model.peft.state_dict().items()}
    full.update({f"prompt.{k}": v for k, v in model.state_dict().items() if "prompt" in k})
    uploaded, whole = _record_bytes(shared), _record_bytes(full)
    return {
        "uploaded_bytes": uploaded,
        "uploaded_tensors": len(shared),
        "full_model_bytes": whole,
        "ratio": uploaded / whole,
        "personal_prompt_bytes": _record_bytes(model.personal_state()),
        "parameters": {
            "shared": sum(v.numel() for v in shared.values()),
            "full": sum(v.numel() for v in full.values()),
        },
    }


def bench_dp_step(population: Population, repeats: int, epochs: int) -> dict[str, Any]:
    """One local epoch of a client holding 32-record batches of ML-100K windows: seconds per
    step of a plain Adam step vs Opacus DP-SGD (Poisson batches of the same expected size)."""
    config, fed = population.config, population.config.federated
    torch.set_num_threads(1)
    split = population.split
    users = trainable_users(split)[:60]
    timings: dict[str, list[float]] = {"plain": [], "hooks": [], "functorch": [], "ghost": []}
    batch = 32
    records = 0
    for _ in range(repeats):
        for mode in timings:
            torch.manual_seed(0)
            model = _model(population, Path(config.output_dir)).model
            examples = model.builder.records(split, users, fed.record_window)
            records = len(examples)
            params = model.trainable_parameters()
            optimizer = torch.optim.Adam(params, lr=1e-3)
            model.train()
            started = time.perf_counter()
            if mode == "plain":
                done = 0
                for _ in range(epochs):
                    for rows in torch.randperm(records).split(batch):
                        loss = model.per_example_loss(*(t[rows] for t in examples.tensors))
                        optimizer.zero_grad(set_to_none=True)
                        loss.mean().backward()
                        optimizer.step()
                        done += 1
            else:
                dp = DPSGDConfig(noise_multiplier=1.0, batch_size=batch, grad_sample_mode=mode)
                done = dp_train(
                    model, examples, dp, epochs, 1e-3, optimizer=optimizer, loss_fn=example_losses
                ).steps
            timings[mode].append((time.perf_counter() - started) / done)
    medians = {mode: statistics.median(values) for mode, values in timings.items()}
    return {
        "records": records,
        "tokens_per_record": int(examples.tensors[1].sum(dim=1).float().mean()),
        "batch_size": batch,
        "seconds_per_step": medians,
        "ratio_vs_plain": {m: medians[m] / medians["plain"] for m in timings if m != "plain"},
        "repeats": repeats,
        "epochs": epochs,
    }


def bench_personal(run_dir: Path) -> dict[str, Any]:
    """Test metrics of every user whose device holds a personal prompt, each evaluated twice
    with the run's global adapters: with that prompt, and with the initial one."""
    population = load_run(run_dir)
    split = population.split
    wrapper = global_model(population, run_dir)
    evaluation = EvalConfig(ks=(10, 20))
    per_user: dict[str, list[dict[str, float]]] = {"personal": [], "initial": []}
    started = time.perf_counter()
    for partition, members in enumerate(population.partitions):
        path = client_paths(run_dir, {"partition-id": partition})[3]
        if not path.exists():
            continue
        for variant, personal in (("personal", path), ("initial", None)):
            scorer = wrapper.scorer(
                split, torch.device("cpu"), None if personal is None else PersonalFile(personal)
            )
            result = evaluate(scorer, split, "test", evaluation, users=np.asarray(members))
            per_user[variant].append(result.metrics)
    means = {
        variant: {k: float(np.mean([m[k] for m in rows])) for k in rows[0] if "Coverage" not in k}
        for variant, rows in per_user.items()
        if rows
    }
    rng = np.random.default_rng(0)
    paired = {
        metric: asdict(
            paired_difference(
                np.array([m[metric] for m in per_user["personal"]]),
                np.array([m[metric] for m in per_user["initial"]]),
                rng,
            )
        )
        for metric in ("NDCG@10", "HR@10")
        if per_user["personal"]
    }
    return {
        "clients_with_personal_prompt": len(per_user["personal"]),
        "clients": len(population.partitions),
        "test": means,
        "personal_minus_initial": paired,
        "seconds": time.perf_counter() - started,
    }


def bench_final(run_dir: Path, baselines: list[Path], few_shot: int) -> dict[str, Any]:
    """The run's global adapters next to popularity and trained centralized models, on the same
    users (the run's evaluation sample) and the same few-shot cut."""
    torch.set_num_threads(2)
    population = load_run(run_dir)
    split, config = population.split, population.config
    users = evaluation_users(split, config.evaluation)
    wrapper = global_model(population, run_dir)
    cpu = torch.device("cpu")
    # Popularity counts every training event in both settings, as the trained models saw them.
    scorers: dict[str, Any] = {
        "llm": wrapper.scorer,
        "popularity": lambda _seen, _device: popularity_scorer(split),
    }
    for run in baselines:
        trained_with = run_config(run)
        if trained_with.data != config.data:
            raise ValueError(f"{run} was trained on other data than {run_dir}: {trained_with.data}")
        trained = load_model(run, trained_with, split.num_items)
        scorers[f"{trained_with.model_name} ({run})"] = functools.partial(model_scorer, trained)
    result: dict[str, Any] = {
        "run": str(run_dir),
        "users": split.num_users if users is None else len(users),
        "few_shot_events": few_shot,
    }
    for setting, seen_by in (("full", split), ("few_shot", split.recent(few_shot, "test"))):
        rows: dict[str, Any] = {}
        for name, scorer_of in scorers.items():
            started = time.perf_counter()
            scorer: Scorer = scorer_of(seen_by, cpu)
            rows[name] = evaluate(scorer, split, "test", config.evaluation, users).metrics
            rows[name]["seconds"] = time.perf_counter() - started
            print(setting, name, json.dumps(rows[name]), flush=True)
        result[setting] = rows
    return result


def bench_centralized(
    population: Population, epochs: int, learning_rate: float, batch: int = 32
) -> tuple[LLMFederatedModel, dict[str, Any]]:
    """Adapters and prompts trained on every event of all users' training histories (one
    shared personal prompt) with Adam; the trained model, and the valid/test metrics of the
    foundation (epoch 0), every 5 epochs and at the end."""
    config, fed = population.config, population.config.federated
    torch.set_num_threads(2)
    split = population.split
    model = _model(population, Path(config.output_dir))
    evaluation = EvalConfig(ks=(10, 20))
    # Every event, in consecutive chunks: the day records a DP client trains on keep only the
    # first record_window + 1 events of each day, a fraction of ML-100K's histories.
    examples = model.model.builder.records(
        split, trainable_users(split), fed.record_window, period=None
    )
    optimizer = torch.optim.Adam(model.model.trainable_parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    started = time.perf_counter()
    for epoch in range(epochs + 1):
        if epoch:
            model.model.train()
            for rows in torch.randperm(len(examples), generator=generator).split(batch):
                loss = model.model.per_example_loss(*(t[rows] for t in examples.tensors))
                optimizer.zero_grad(set_to_none=True)
                loss.mean().backward()
                optimizer.step()
        if epoch in (0, epochs) or epoch % 5 == 0:
            scorer = model.scorer(split, torch.device("cpu"))
            row = {
                "epoch": epoch,
                "valid": evaluate(scorer, split, "valid", evaluation).metrics,
                "test": evaluate(scorer, split, "test", evaluation).metrics,
                "seconds": time.perf_counter() - started,
            }
            print(json.dumps(row), flush=True)
            history.append(row)
    return model, {"records": len(examples), "history": history}


def bench_teacher(
    population: Population, epochs: int, learning_rate: float, top_k: int, lists: Path
) -> dict[str, Any]:
    """``centralized``, then the trained model's top-``top_k`` lists after every user's
    training history, saved to ``lists`` for ``train.distill.teacher``."""
    model, result = bench_centralized(population, epochs, learning_rate)
    started = time.perf_counter()
    source = f"LLM recommender trained centrally ({population.config.output_dir}, {epochs} epochs)"
    teacher = teacher_lists(
        model.scorer(population.split, torch.device("cpu")), population.split, top_k, source
    )
    teacher.save(lists)
    return result | {
        "lists": str(lists),
        "top_k": top_k,
        "list_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "what", choices=["bytes", "dp-step", "personal", "final", "centralized", "teacher"]
    )
    parser.add_argument("--config", help="LLM experiment YAML (bytes, dp-step)")
    parser.add_argument("--run", type=Path, help="finished LLM run folder (personal, final)")
    parser.add_argument(
        "--baseline",
        type=Path,
        action="append",
        default=[],
        help="finished HSTU/SASRec run folder measured next to the LLM (final; repeatable)",
    )
    parser.add_argument("--few-shot", type=int, default=5, help="events kept (final)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (centralized)")
    parser.add_argument("--top-k", type=int, default=20, help="items per teacher list (teacher)")
    parser.add_argument("--lists", type=Path, help="where the teacher lists go (teacher)")
    parser.add_argument("--output", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.what == "personal":
        if args.run is None:
            parser.error("personal needs --run")
        result = bench_personal(args.run)
    elif args.what == "final":
        if args.run is None:
            parser.error("final needs --run")
        result = bench_final(args.run, args.baseline, args.few_shot)
    else:
        if args.config is None:
            parser.error(f"{args.what} needs --config")
        population = load_population(str(Path(args.config).resolve()))
        load_config(args.config)  # fail early, with file:line, on a bad config
        if args.what == "bytes":
            result = bench_bytes(population)
        elif args.what == "centralized":
            result = bench_centralized(population, args.epochs, args.lr)[1]
        elif args.what == "teacher":
            if args.lists is None:
                parser.error("teacher needs --lists")
            result = bench_teacher(population, args.epochs, args.lr, args.top_k, args.lists)
        else:
            result = bench_dp_step(population, args.repeats, args.epochs)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
