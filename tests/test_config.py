"""Every YAML in configs/ validates; bad options are reported with file, line and a fix."""

from pathlib import Path

import pytest

from fedrec.config import ExperimentConfig, load_config, parse_config
from fedrec.errors import FedrecConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {
        "synthetic.yaml",
        "ml-100k-hstu.yaml",
        "ml-100k-sasrec.yaml",
        "ml-1m-hstu.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    assert config.train.monitor.split("@")[-1] in {str(k) for k in config.evaluation.ks}
    round_trip = parse_config(config.to_dict())
    assert round_trip.to_dict() == config.to_dict()


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_unknown_option_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "seed: 1\ntrain:\n  epochs: 3\n  learnig_rate: 0.1\n")
    with pytest.raises(FedrecConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:4" in message and "train.learnig_rate" in message and "learning_rate" in message


def test_wrong_type_is_reported(tmp_path):
    path = write(tmp_path, "train:\n  epochs: many\n")
    with pytest.raises(FedrecConfigError, match=r"bad.yaml:2: train.epochs: expected int"):
        load_config(path)


def test_invalid_value_is_reported_with_its_section(tmp_path):
    path = write(tmp_path, "data:\n  preprocess:\n    min_sequence_length: 2\n")
    with pytest.raises(
        FedrecConfigError, match=r"bad.yaml:2: data.preprocess: .*min_sequence_length"
    ):
        load_config(path)


def test_model_options_are_validated_by_the_model_config(tmp_path):
    path = write(tmp_path, "model:\n  name: sasrec\n  num_heads: 3\n  embedding_dim: 50\n")
    with pytest.raises(FedrecConfigError, match="divide by num_heads"):
        load_config(path)
    path = write(tmp_path, "model:\n  name: transformer4rec\n")
    with pytest.raises(FedrecConfigError, match=r"bad.yaml:2: model.name: unknown model"):
        load_config(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(FedrecConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "train: [1,\n"))
    with pytest.raises(FedrecConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_lists_become_tuples_and_ints_become_floats(tmp_path):
    config = load_config(
        write(tmp_path, "evaluation:\n  ks: [5, 10]\ntrain:\n  learning_rate: 1\n")
    )
    assert config.evaluation.ks == (5, 10)
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
