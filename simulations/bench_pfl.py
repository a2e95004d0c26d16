"""Seconds per federated round of Apple's pfl-research (pfl) and of fedrec, side by side in one
run, on the same model, population and cohort: HSTU FedSGD (each sampled user takes ONE local SGD
step, learning rate ``federated.local_learning_rate``, on its own whole training sequence; the
server applies Adam, learning rate ``server_learning_rate``, ε ``server_tau``, to the average
update).

    python simulations/bench_pfl.py --config configs/synthetic-100k-fedsgd.yaml --rounds 6 \
        --pfl-python /tmp/pflenv/bin/python --output runs/bench-pfl \
        [--users N] [--clients-per-round C] [--users-per-node K] [--user-dp SIGMA CLIP]

Both engines read one config: ``--config`` with ``--users`` / ``--clients-per-round`` /
``--rounds`` applied, written to ``OUTPUT/config.yaml``. pfl: one user = one client whose
dataset is its training row (``training_batch``: items, times, targets), one local epoch with
the whole user dataset as the batch, ``torch.optim.SGD`` locally, ``torch.optim.Adam`` centrally
(β = 0.9, 0.99 as Flower's FedAdam), pfl's own user sampler, ``SimulatedBackend`` in one process,
no postprocessors (no DP, no weighting: every user weighs 1; with ``--user-dp`` pfl's
``CentrallyAppliedPrivacyMechanism(GaussianMechanism)``, fedrec's ``central_dp`` over a fixed
cohort), no evaluation after the first iteration, on the CPU (``--pfl-device``) with ``--threads`` torch threads. fedrec:
``bench_federated.bench_round`` (the Flower simulation with cohort nodes of ``users_per_node``
clients, and the in-process loop). Each engine's figure is the median seconds per round with
the first round (start-up, pfl's evaluation at iteration 0) excluded. The result,
``OUTPUT/pfl.json``, holds both medians, the ratio pfl / fedrec-Flower, pfl's version and
settings and the machine.

pfl runs in a subprocess from its own virtual environment (``--pfl-python``): its pins
(dp-accounting<0.6 among them) clash with the project's, so it is not a project dependency. That
environment must see fedrec and torch (e.g. a ``.pth`` file pointing at the project venv's
site-packages); the worker is this script with ``--pfl-worker``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: make `simulations` and `fedrec` importable

SAMPLERS = ("minimize_reuse", "random")


def effective_config(
    config_path: str,
    users: int | None,
    clients_per_round: int | None,
    rounds: int,
    user_dp: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """``config_path``'s YAML with the command line's population, cohort, rounds and, with
    ``user_dp`` (σ, C), user-level DP over a fixed cohort."""
    config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    if user_dp is not None:
        noise, clip = user_dp
        config["federated"]["central_dp"] = {
            "noise_multiplier": noise,
            "clipping_norm": clip,
            "sampling": "fixed",
        }
    if users is not None:
        config["data"]["synthetic"]["num_users"] = users
    if clients_per_round is not None:
        config["federated"]["clients_per_round"] = clients_per_round
    config["federated"]["num_rounds"] = rounds
    return config


def run_pfl(
    config_path: Path, sampler: str, threads: int, seed: int, device: str
) -> dict[str, Any]:
    """Train ``config_path``'s federation with pfl for its ``num_rounds`` rounds; return seconds
    per central iteration and the settings used. Runs in pfl's environment."""
    # pfl reads the device when it creates tensors; fedrec's engines run on the CPU.
    os.environ["PFL_PYTORCH_DEVICE"] = device
    import numpy as np
    import pfl
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    from fedrec.config import parse_config
    from fedrec.data import prepare_split
    from fedrec.data.batching import training_batch
    from fedrec.models import build_model
    from fedrec.training import trainable_users

    torch.set_num_threads(threads)
    np.random.seed(seed)
    torch.manual_seed(seed)
    config = parse_config(yaml.safe_load(config_path.read_text(encoding="utf-8")), str(config_path))
    fed = config.federated

    started = time.perf_counter()
    _, split = prepare_split(config.data)
    users = trainable_users(split)
    # One batched gather for the whole population; make_dataset_fn only slices a row.
    items, times, targets = training_batch(split, users, config.model.max_len)
    row_of = {int(user): row for row, user in enumerate(users)}

    def make_dataset(user: int) -> Dataset:
        row = row_of[user]
        # Torch tensors pass through pfl's to_tensor as they are; numpy arrays would be cast
        # to float32, which the embedding lookups reject.
        return Dataset(
            (items[row : row + 1], times[row : row + 1], targets[row : row + 1]), user_id=user
        )

    ids = [int(u) for u in users]
    if sampler == "minimize_reuse":
        # pfl cycles through the list in order: shuffle it once so a cohort is a random draw
        # without replacement, as fedrec's.
        np.random.default_rng(seed).shuffle(ids)
    dataset = FederatedDataset(make_dataset, get_user_sampler(sampler, ids))

    class PflHSTU(torch.nn.Module):
        """fedrec's model with the ``loss`` and ``metrics`` methods pfl's PyTorchModel calls."""

        def __init__(self) -> None:
            super().__init__()
            self.net = build_model(config.model_name, split.num_items, config.model)

        def loss(
            self, items: torch.Tensor, times: torch.Tensor, targets: torch.Tensor, eval=False
        ) -> torch.Tensor:
            self.train(not eval)  # pfl never switches modes itself: dropout must be on here
            return self.net.loss(items, times, targets)

        @torch.no_grad()
        def metrics(
            self, items: torch.Tensor, times: torch.Tensor, targets: torch.Tensor, eval=True
        ) -> dict[str, Any]:
            self.train(not eval)
            return {"loss": Weighted.from_unweighted(self.net.loss(items, times, targets).item())}

    module = PflHSTU()
    # Flower's FedAdam (fedrec's server) uses β2 = 0.99, not torch's 0.999.
    central = torch.optim.Adam(
        module.parameters(), lr=fed.server_learning_rate, betas=(0.9, 0.99), eps=fed.server_tau
    )
    model = PyTorchModel(module, local_optimizer_create=torch.optim.SGD, central_optimizer=central)
    cohort = min(fed.clients_per_round, len(ids))
    rounds = fed.num_rounds
    algorithm_params = NNAlgorithmParams(
        central_num_iterations=rounds,
        # pfl evaluates when iteration % frequency == 0, so iteration 0 always does (excluded
        # with the first round); a frequency past the last iteration skips every other one.
        evaluation_frequency=rounds + 1,
        train_cohort_size=cohort,
        val_cohort_size=None,
    )
    train_params = NNTrainHyperParams(
        local_num_epochs=fed.local_epochs,
        local_learning_rate=fed.local_learning_rate,
        local_batch_size=None,  # the whole user dataset (its one row): one step per epoch
    )
    postprocessors: list[Any] = []
    if fed.central_dp is not None:  # user-level DP: each update clipped, the sum noised
        from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism

        mechanism = GaussianMechanism(fed.central_dp.clipping_norm, fed.central_dp.noise_multiplier)
        postprocessors.append(CentrallyAppliedPrivacyMechanism(mechanism))
    backend = SimulatedBackend(
        training_data=dataset, val_data=dataset, postprocessors=postprocessors
    )
    setup_seconds = time.perf_counter() - started

    class RoundTimer(TrainingProcessCallback):
        """Wall seconds between consecutive central iterations' ends (the first from the start
        of training): sampling, local training, aggregation and the central update."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.last = time.perf_counter()

        def on_train_begin(self, *, model: Any) -> Metrics:
            self.last = time.perf_counter()
            return Metrics()

        def after_central_iteration(
            self, aggregate_metrics: Metrics, model: Any, *, central_iteration: int
        ) -> tuple[bool, Metrics]:
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now
            return False, Metrics()

    timer = RoundTimer()
    initial = torch.nn.utils.parameters_to_vector(module.parameters()).detach().clone()
    FederatedAveraging().run(
        algorithm_params=algorithm_params,
        backend=backend,
        model=model,
        model_train_params=train_params,
        model_eval_params=NNEvalHyperParams(local_batch_size=None),
        callbacks=[timer],
        send_metrics_to_platform=False,  # the generic platform prints every metric to stdout
    )
    final = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
    distributed = get_default_framework_module().distributed
    return {
        "version": pfl.__version__,
        "backend": type(backend).__name__,
        "algorithm": "FederatedAveraging",
        "worker_processes": distributed.world_size,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "population": len(ids),
        "clients_per_round": cohort,
        "rounds": rounds,
        "user_sampler": sampler,
        "local_num_epochs": fed.local_epochs,
        "local_batch_size": "whole user dataset (1 row, max_len positions)",
        "local_optimizer": f"SGD lr {fed.local_learning_rate}",
        "central_optimizer": (
            f"Adam lr {fed.server_learning_rate} betas (0.9, 0.99) eps {fed.server_tau}"
        ),
        "aggregation": "unweighted mean of model differences",
        "dp": fed.central_dp is not None,
        "postprocessors": [
            f"{type(p).__name__}(GaussianMechanism(clip {fed.central_dp.clipping_norm}, "
            f"σ {fed.central_dp.noise_multiplier}))"
            for p in postprocessors
            if fed.central_dp is not None
        ],
        "evaluation": "iteration 0 only (excluded)",
        # a check that the rounds trained: ‖final − initial‖ / ‖initial‖ > 0
        "model_moved": float((final - initial).norm() / initial.norm()),
        "setup_seconds": setup_seconds,
        "round_seconds": timer.seconds,
        "first_round_seconds": timer.seconds[0],
        "seconds_per_round": statistics.median(timer.seconds[1:] or timer.seconds),
    }


def bench_pfl(
    pfl_python: str,
    config_path: Path,
    output: Path,
    sampler: str,
    threads: int,
    seed: int,
    device: str,
) -> dict[str, Any]:
    """Run ``run_pfl`` with ``pfl_python`` (pfl's own environment); return its result."""
    result_path = output / "pfl-worker.json"
    result_path.unlink(missing_ok=True)
    command = [
        pfl_python,
        str(Path(__file__).resolve()),
        "--pfl-worker",
        "--config",
        str(config_path),
        "--pfl-result",
        str(result_path),
        "--pfl-sampler",
        sampler,
        "--threads",
        str(threads),
        "--seed",
        str(seed),
        "--pfl-device",
        device,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with (output / "pfl.log").open("wb") as log:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"the pfl worker failed ({done.returncode}), see {output / 'pfl.log'}")
    return json.loads(result_path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/synthetic-100k-fedsgd.yaml")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per engine (first excluded)")
    parser.add_argument("--users", type=int, help="synthetic users (default: the config's)")
    parser.add_argument("--clients-per-round", type=int, help="default: the config's")
    parser.add_argument(
        "--users-per-node", type=int, help="fedrec's cohort nodes (default: the config's)"
    )
    parser.add_argument("--pfl-python", default="/tmp/pflenv/bin/python")
    parser.add_argument("--pfl-sampler", choices=SAMPLERS, default="minimize_reuse")
    parser.add_argument("--pfl-device", default="cpu", help="PFL_PYTORCH_DEVICE for pfl")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in pfl's process")
    parser.add_argument(
        "--user-dp",
        nargs=2,
        type=float,
        metavar=("SIGMA", "CLIP"),
        help="both engines with user-level DP: noise multiplier and clipping norm (fedrec's "
        "cohort nodes then send sums of clipped updates; pfl: its central Gaussian mechanism)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/bench-pfl", help="folder for results")
    parser.add_argument(
        "--pfl-worker",
        action="store_true",
        help="internal: run the pfl side (started by this script under --pfl-python)",
    )
    parser.add_argument("--pfl-result", help="internal: where the pfl side writes its JSON")
    args = parser.parse_args(argv)

    if args.pfl_worker:
        result = run_pfl(
            Path(args.config), args.pfl_sampler, args.threads, args.seed, args.pfl_device
        )
        Path(args.pfl_result).write_text(json.dumps(result, indent=2), encoding="utf-8")
        return 0

    import torch

    from simulations.bench_federated import bench_round

    if args.rounds < 2:
        parser.error("--rounds must be >= 2: the first round is excluded")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    user_dp = None if args.user_dp is None else (args.user_dp[0], args.user_dp[1])
    config = effective_config(args.config, args.users, args.clients_per_round, args.rounds, user_dp)
    config_path = output / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    fed = config["federated"]
    users_per_node = args.users_per_node or fed.get("users_per_node", 1)

    pfl_result = bench_pfl(
        args.pfl_python,
        config_path,
        output,
        args.pfl_sampler,
        args.threads,
        args.seed,
        args.pfl_device,
    )
    fedrec_result = bench_round(
        output / "fedrec",
        fed["clients_per_round"],
        args.rounds,
        str(config_path),
        users_per_node,
    )
    fedrec_seconds = fedrec_result["seconds_per_round"]
    pfl_seconds = pfl_result["seconds_per_round"]
    same = fedrec_seconds.get("inprocess_same", fedrec_seconds["inprocess_per_client"])
    result = {
        "what": "seconds per round, HSTU FedSGD + server Adam, median with round 1 excluded",
        "user_dp": None
        if user_dp is None
        else {"noise_multiplier": user_dp[0], "clip": user_dp[1]},
        "config": args.config,
        "users": config["data"]["synthetic"]["num_users"],
        "clients_per_round": fed["clients_per_round"],
        "rounds": args.rounds,
        "seconds_per_round": {
            "pfl": pfl_seconds,
            **{f"fedrec_{name}": value for name, value in fedrec_seconds.items()},
        },
        "ratio_pfl_to_fedrec_flower": pfl_seconds / fedrec_seconds["flower"],
        # fedrec's in-process loop with the same cohort nodes: the ratio without Flower's runtime
        "ratio_pfl_to_fedrec_inprocess_same": pfl_seconds / same,
        "pfl": pfl_result,
        "fedrec": fedrec_result,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    (output / "pfl.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
