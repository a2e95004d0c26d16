"""The `fedrec` command, end to end on small data."""

import json
import math
import re
import subprocess
import sys
import urllib.error
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.config import load_config
from fedrec.data import prepare_split
from fedrec.models import build_model

from .conftest import ML100K

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Discovered from the Typer app itself, so a new command is covered without editing this file.
COMMANDS = typer.main.get_command(app).commands
# Every script in simulations/ that runs as a program.
SCRIPTS = sorted(
    path.name
    for path in (REPO / "simulations").glob("*.py")
    if re.search(r"""^if __name__ == ["']__main__["']:""", path.read_text(), re.MULTILINE)
)


def _flat(text: str) -> str:
    """Help text without Rich's panel borders and line wrapping: one space between words."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_command_discovery_sees_the_known_commands():
    # Guards the parametrisations below against discovering nothing.
    assert {"train", "simulate", "semantic-ids", "data-summary", "download", "models"} <= set(
        COMMANDS
    )
    assert {"bench_centralized.py", "bench_federated.py", "inprocess.py"} <= set(SCRIPTS)


def test_top_level_help_lists_every_command():
    result = runner.invoke(app, ["--help"], prog_name="fedrec")
    assert result.exit_code == 0, result.output
    text = _flat(result.output)
    assert "Usage: fedrec [OPTIONS] COMMAND" in text
    assert _flat(app.info.help) in text
    for name, command in COMMANDS.items():
        assert re.search(rf"(^|\s){re.escape(name)}\s", text), name
        assert _flat(command.get_short_help_str(limit=10_000)).split(".")[0] in text, name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_explains_every_command(name):
    command = COMMANDS[name]
    result = runner.invoke(app, [name, "--help"], prog_name="fedrec")
    assert result.exit_code == 0, result.output
    text = _flat(result.output)
    assert f"Usage: fedrec {name}" in text
    # The description: the docstring's first paragraph.
    description = _flat((command.help or "").split("\n\n")[0])
    assert description, f"{name} has no docstring"
    assert description in text
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        if param.param_type_name == "argument":
            assert param.name.lower() in text.lower(), (name, param.name)
        else:
            for option in [*param.opts, *param.secondary_opts]:
                assert re.search(rf"(^|\s){re.escape(option)}(\s|$)", text), (name, option)
            if param.help:
                assert _flat(param.help).split()[0] in text, (name, param.help)


def test_every_config_taking_command_documents_config():
    takes_config = [n for n, c in COMMANDS.items() if any("--config" in p.opts for p in c.params)]
    assert {"train", "simulate", "semantic-ids", "data-summary"} <= set(takes_config)
    for name in takes_config:
        text = _flat(runner.invoke(app, [name, "--help"], prog_name="fedrec").output)
        assert "--config -c" in text and "Experiment YAML (see configs/)" in text, name


@pytest.fixture(scope="module")
def script_helps() -> dict[str, subprocess.CompletedProcess]:
    """`python simulations/X.py --help` and the installed `fedrec --help`, run concurrently
    (each pays for importing torch and Flower)."""
    commands = {script: [sys.executable, f"simulations/{script}", "--help"] for script in SCRIPTS}
    commands["fedrec"] = [str(Path(sys.executable).with_name("fedrec")), "--help"]
    running = {
        key: subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for key, argv in commands.items()
    }
    done = {}
    for key, process in running.items():
        out, err = process.communicate(timeout=300)
        done[key] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


@pytest.mark.parametrize("script", SCRIPTS)
def test_simulation_script_help(script, script_helps):
    result = script_helps[script]
    assert result.returncode == 0, result.stderr
    usage, _, rest = result.stdout.partition("\n\n")
    assert usage.startswith(f"usage: {script}")
    # A description before the argument sections.
    description = rest.split("\n\n")[0].strip()
    assert description and not description.startswith(("options:", "positional arguments:"))
    source = (REPO / "simulations" / script).read_text()
    declared = re.findall(r"""add_argument\(\s*((?:["'][^"']+["']\s*,\s*)+)""", source)
    options = [o for group in declared for o in re.findall(r"""["'](-[^"']+)["']""", group)]
    assert options, f"{script}: no options found in its source"
    for option in options:
        assert re.search(rf"(^|[\s\[,]){re.escape(option)}([\s\],=]|$)", result.stdout), (
            script,
            option,
        )


def test_installed_fedrec_program_lists_every_command(script_helps):
    result = script_helps["fedrec"]
    assert result.returncode == 0, result.stderr
    text = _flat(result.stdout)
    assert "Usage: fedrec [OPTIONS] COMMAND" in text
    for name in COMMANDS:
        assert re.search(rf"(^|\s){re.escape(name)}\s", text), name


def tiny_config(tmp_path: Path, model: str = "hstu") -> Path:
    config = yaml.safe_load((REPO / "configs" / "synthetic.yaml").read_text())
    config["data"]["synthetic"].update(num_users=120, num_items=60, mean_length=12)
    config["model"].update(name=model, max_len=16, embedding_dim=16)
    config["train"].update(epochs=4, eval_every=2, patience=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def brute_force_metrics(scores: np.ndarray, split, stage: str, ks) -> dict[str, float]:
    """Full-ranking metrics from per-user scores [users, items], one user and item at a time:
    the user's visible history is excluded, the target ranks after every other remaining item
    scoring at least as high (pessimistic ties), HR@k = rank <= k, NDCG@k = 1/log2(rank + 1),
    MRR = 1/rank, Coverage@k = share of items in some user's top k."""
    totals = {"MRR": 0.0} | {f"{m}@{k}": 0.0 for k in ks for m in ("HR", "NDCG")}
    shown: dict[int, set[int]] = {k: set() for k in ks}
    for user in range(split.num_users):
        items = split.full(user)[0].tolist()
        history = set(items[: -2 if stage == "valid" else -1])
        target = items[-2 if stage == "valid" else -1]
        candidates = [i for i in range(split.num_items) if i not in history]
        row = scores[user]
        rank = (
            math.inf
            if target in history
            else 1 + sum(1 for i in candidates if i != target and row[i] >= row[target])
        )
        totals["MRR"] += 1.0 / rank
        for k in ks:
            if rank <= k:
                totals[f"HR@{k}"] += 1.0
                totals[f"NDCG@{k}"] += 1.0 / math.log2(rank + 1)
            shown[k] |= set(sorted(candidates, key=lambda i: -row[i])[:k])
    metrics = {name: total / split.num_users for name, total in totals.items()}
    return metrics | {f"Coverage@{k}": len(shown[k]) / split.num_items for k in ks}


def model_scores(model, split, stage: str) -> np.ndarray:
    """Scores of every user, each history built here: the last max_len visible items, ids
    shifted by one, left-padded with 0."""
    max_len = model.config.max_len
    items = np.zeros((split.num_users, max_len), dtype=np.int64)
    times = np.zeros((split.num_users, max_len), dtype=np.int64)
    for user in range(split.num_users):
        seen, seen_times = split.history(user, stage)
        seen, seen_times = seen[-max_len:], seen_times[-max_len:]
        if len(seen):
            items[user, -len(seen) :] = seen + 1
            times[user, -len(seen) :] = seen_times
    model.eval()
    with torch.no_grad():
        return model.score_all(torch.from_numpy(items), torch.from_numpy(times)).double().numpy()


def assert_metrics_equal(reported: dict[str, float], expected: dict[str, float]) -> None:
    assert set(reported) == set(expected)
    for name, value in expected.items():
        assert reported[name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.parametrize("model", ["hstu", "sasrec"])
def test_train_writes_results_and_a_loadable_checkpoint(tmp_path, model):
    run = tmp_path / "run"
    config_path = tiny_config(tmp_path, model)
    result = runner.invoke(
        app,
        [
            "train",
            "-c",
            str(config_path),
            "--output-dir",
            str(run),
            "--no-progress",
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((run / "results.json").read_text())
    assert results["model"] == model and results["seed"] == 3
    config = load_config(config_path)
    ks = config.evaluation.ks
    assert ks == (10, 20, 50)
    dataset, split = prepare_split(config.data)
    assert results["data"] == json.loads(json.dumps(dataset.summary()))

    # The popularity baseline, from the data alone: items scored by their interactions in the
    # visible (test) histories of all users.
    counts = np.zeros(split.num_items)
    for user in range(split.num_users):
        for item in split.history(user, "test")[0]:
            counts[item] += 1
    popularity = brute_force_metrics(np.tile(counts, (split.num_users, 1)), split, "test", ks)
    popularity = {k: v for k, v in popularity.items() if not k.startswith("Coverage")}
    reported = results["baselines"]["popularity"]["test"]
    assert_metrics_equal({k: v for k, v in reported.items() if k in popularity}, popularity)
    assert 0 < popularity["HR@10"] < 1  # the comparison is not vacuous

    # The checkpoint holds the weights that were tested: a fresh model loaded from it
    # reproduces the reported test and validation metrics, recomputed by brute force.
    checkpoint = torch.load(run / "best.pt", weights_only=False)
    fresh = build_model(model, split.num_items, config.model)
    assert results["parameters"] == sum(p.numel() for p in fresh.parameters())
    fresh.load_state_dict(checkpoint["model"])
    assert_metrics_equal(
        results["test"], brute_force_metrics(model_scores(fresh, split, "test"), split, "test", ks)
    )
    assert_metrics_equal(
        results["valid"],
        brute_force_metrics(model_scores(fresh, split, "valid"), split, "valid", ks),
    )
    assert checkpoint["valid"] == results["valid"] and checkpoint["num_items"] == split.num_items

    # Early stopping: epochs 2 and 4 are validated (patience 2 cannot trigger); the best is the
    # first with the highest validation NDCG@10.
    assert results["epochs_run"] == 4 and [h["epoch"] for h in results["history"]] == [1, 2, 3, 4]
    validated = {h["epoch"]: h["valid"] for h in results["history"] if "valid" in h}
    assert list(validated) == [2, 4]
    best = max(validated, key=lambda epoch: (validated[epoch]["NDCG@10"], -epoch))
    assert results["best_epoch"] == checkpoint["epoch"] == best
    assert results["valid"] == validated[best]

    assert results["environment"]["versions"]["torch"] == metadata.version("torch")
    assert results["config"] == yaml.safe_load((run / "config.yaml").read_text())
    assert results["config"]["model"]["name"] == model and results["config"]["seed"] == 3


def test_bad_config_exits_with_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    result = runner.invoke(app, ["train", "-c", str(path)])
    assert result.exit_code == 2
    assert "bad.yaml:2" in result.output and "epochs" in result.output


def test_missing_data_dir_is_named(tmp_path):
    result = runner.invoke(app, ["data-summary", "-c", str(REPO / "configs" / "ml-1m-hstu.yaml")])
    assert result.exit_code == 2 and "--data-dir" in result.output


@pytest.mark.skipif(not ML100K.exists(), reason="MovieLens-100K is not at ../shared/data/ml-100k")
def test_data_summary_on_movielens(tmp_path):
    result = runner.invoke(
        app,
        [
            "data-summary",
            "-c",
            str(REPO / "configs" / "ml-100k-hstu.yaml"),
            "--data-dir",
            str(ML100K),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["raw"]["interactions"] == 100_000 and summary["preprocessed"]["users"] == 943
    assert {"title", "genres", "year"} <= set(summary["item_features"])


def test_download_offline_fails_fast_and_names_data_dir(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    result = runner.invoke(app, ["download", "ml-100k", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--data-dir" in result.output
