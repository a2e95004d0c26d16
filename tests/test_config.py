"""Every YAML in configs/ validates; bad options are reported with file, line and a fix."""

import dataclasses
from pathlib import Path

import pytest
import yaml

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


def leaves(data: dict, prefix: tuple[str, ...] = ()):
    """(dotted path, value) of every option set in a YAML mapping."""
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def option(config: ExperimentConfig, path: tuple[str, ...]):
    if path == ("model", "name"):
        return config.model_name
    value = config
    for part in path:
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    config = load_config(path)
    # Every option of the file is in the parsed config, with the file's value (lists as
    # tuples, ints in float options as floats); parsing the config back gives it again.
    written = list(leaves(yaml.safe_load(path.read_text())))
    assert written
    for at, value in written:
        parsed = option(config, at)
        if isinstance(value, list):
            assert parsed == tuple(value), at
        elif isinstance(value, dict):  # an empty mapping switches a section on with defaults
            assert value == {} and parsed is not None, at
        else:
            assert parsed == value, at
    assert config.train.monitor.split("@")[-1] in {str(k) for k in config.evaluation.ks}
    round_trip = parse_config(config.to_dict())
    assert round_trip == config
    assert round_trip.to_dict() == config.to_dict()


def test_an_empty_config_is_all_defaults(tmp_path):
    assert load_config(write(tmp_path, "{}\n")) == ExperimentConfig()
    assert parse_config({}) == ExperimentConfig()
    config = load_config(write(tmp_path, "seed: 7\n"))
    assert config == dataclasses.replace(ExperimentConfig(), seed=7)


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


def test_dp_records_longer_than_the_model_are_refused_at_load(tmp_path):
    path = write(
        tmp_path,
        "model:\n  max_len: 16\nfederated:\n  record_window: 20\n"
        "  record_dp:\n    noise_multiplier: 1.0\n",
    )
    with pytest.raises(FedrecConfigError, match="record_window <= max_len"):
        load_config(path)


def test_record_dp_with_the_full_softmax_is_refused_at_load(tmp_path):
    path = write(
        tmp_path,
        "model:\n  loss: full_softmax\nfederated:\n  record_dp:\n    noise_multiplier: 1.0\n",
    )
    with pytest.raises(FedrecConfigError, match=r"bad.yaml:2: federated.record_dp needs .*sampled"):
        load_config(path)


def test_an_even_secagg_share_count_is_refused_with_the_odd_one_named(tmp_path):
    path = write(
        tmp_path,
        "federated:\n  central_dp: {}\n  secure_aggregation:\n    num_shares: 6\n",
    )
    with pytest.raises(
        FedrecConfigError, match=r"bad.yaml:3: federated.secure_aggregation: .*must be odd.*use 7"
    ):
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
    assert (type(config.train.learning_rate), config.train.learning_rate) == (float, 1.0)
    assert yaml.safe_dump(config.to_dict()["train"]["learning_rate"]) == "1.0\n...\n"
