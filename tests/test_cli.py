"""The `fedrec` command, end to end on small data."""

import json
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedrec.cli import app

from .conftest import ML100K

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["train"],
        ["simulate"],
        ["privacy-report"],
        ["audit-report"],
        ["data-summary"],
        ["download"],
        ["models"],
    ],
)
def test_help_explains_every_command(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output) > 200


def tiny_config(tmp_path: Path, model: str = "hstu") -> Path:
    config = yaml.safe_load((REPO / "configs" / "synthetic.yaml").read_text())
    config["data"]["synthetic"].update(num_users=120, num_items=60, mean_length=12)
    config["model"].update(name=model, max_len=16, embedding_dim=16)
    config["train"].update(epochs=4, eval_every=2, patience=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("model", ["hstu", "sasrec"])
def test_train_writes_results_and_a_loadable_checkpoint(tmp_path, model):
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "-c",
            str(tiny_config(tmp_path, model)),
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
    assert set(results["test"]) >= {"NDCG@10", "HR@10", "MRR", "Coverage@10"}
    assert all(0.0 <= v <= 1.0 for v in results["test"].values())
    assert results["baselines"]["popularity"]["test"]["NDCG@10"] >= 0.0
    assert results["environment"]["versions"]["torch"].startswith("2.13")
    assert results["wall_seconds"] > 0 and results["epochs_run"] == 4
    checkpoint = torch.load(run / "best.pt", weights_only=False)
    assert checkpoint["epoch"] == results["best_epoch"]
    assert checkpoint["valid"] == results["valid"]
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == model


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
