"""Ranking distillation (fedrec.distillation): the loss against a one-user-at-a-time oracle,
teacher lists that read only training data, and a student that learns what its teacher ranks."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from fedrec.config import parse_config
from fedrec.data import prepare_split
from fedrec.data.batching import history_batch
from fedrec.distillation import (
    DistillConfig,
    TeacherLists,
    distillation_losses,
    item_weights,
    rank_weights,
    teacher_lists,
)
from fedrec.experiment import run_centralized
from fedrec.federated_models import initial_federated_model
from fedrec.models import build_model
from fedrec.population import population_of

from .tiny import TINY_HSTU_FEDERATION

TINY = {k: v for k, v in copy.deepcopy(TINY_HSTU_FEDERATION).items() if k != "federated"}
TINY["train"] = {"epochs": 6, "eval_every": 3, "batch_size": 16, "progress": False}


@pytest.mark.parametrize("loss", ["softmax", "pointwise"])
@pytest.mark.parametrize("consistency", [0.0, 0.7])
def test_distillation_loss_equals_its_definition_one_user_at_a_time(loss, consistency):
    torch.manual_seed(0)
    logits = torch.randn(4, 12)
    teacher = torch.tensor([[4, 1, 7], [0, -1, -1], [-1, -1, -1], [2, 9, 5]])
    assert math.isclose(float(rank_weights(3, 2.0).sum()), 1.0, rel_tol=1e-6)
    weights = item_weights(logits, teacher, 2.0, consistency)
    got = distillation_losses(logits, teacher, weights, loss)
    for user in range(4):
        own_top = set(torch.topk(logits[user], 3).indices.tolist())
        listed = [(r, int(i)) for r, i in enumerate(teacher[user]) if i >= 0]
        if not listed:
            assert got[user] == 0
            continue
        raw = {
            r: math.exp(-r / 2.0) / sum(math.exp(-j / 2.0) for j in range(3))
            + consistency * (i in own_top)
            for r, i in listed
        }
        total = sum(raw.values())
        if loss == "softmax":
            log_p = torch.log_softmax(logits[user], dim=0)
        else:
            log_p = torch.nn.functional.logsigmoid(logits[user])
        expected = -sum(raw[r] / total * float(log_p[i]) for r, i in listed)
        assert math.isclose(float(got[user]), expected, rel_tol=1e-5), (user, got[user])
    if consistency:  # the student's own top 3 holds some teacher items: weights moved
        assert not torch.allclose(weights, item_weights(logits, teacher, 2.0, 0.0))


def test_teacher_lists_read_only_the_training_history_and_never_list_it():
    config = parse_config(TINY)
    _, split = prepare_split(config.data)
    stages = []

    def scorer(users, stage):
        stages.append(stage)
        return torch.arange(split.num_items, dtype=torch.float32).repeat(len(users), 1)

    lists = teacher_lists(scorer, split, 5, "test teacher")
    assert set(stages) == {"valid"}  # the input is the history before the validation item
    assert lists.items.shape == (split.num_users, 5)
    for user in range(split.num_users):
        seen = set(split.history(user, "valid")[0].tolist())
        unseen = [i for i in range(split.num_items - 1, -1, -1) if i not in seen]
        assert lists.items[user].tolist() == unseen[:5]


@pytest.mark.parametrize("loss", ["softmax", "pointwise"])
def test_a_distilled_student_learns_what_its_teacher_ranks(tmp_path, loss):
    """A teacher that ranks one item first for every user: the distilled student ranks it far
    higher after its training history than the same student trained alone."""
    base = parse_config(TINY)
    _, split = prepare_split(base.data)
    counts = np.bincount(split.items, minlength=split.num_items)
    favourite = int(np.argmin(counts))  # the rarest item: the student alone ranks it low
    items = np.full((split.num_users, 3), -1)
    items[:, 0] = favourite
    TeacherLists(items, "one item").save(tmp_path / "teacher.npz")

    ranks = {}
    for name, weight in (("alone", 0.0), ("distilled", 5.0)):
        config = parse_config(TINY)
        config.train = dataclasses.replace(
            config.train,
            distill=DistillConfig(str(tmp_path / "teacher.npz"), weight, 3, 1.0, loss=loss),
        )
        run_centralized(config, tmp_path / name)
        student = build_model(config.model_name, split.num_items, config.model)
        student.load_state_dict(torch.load(tmp_path / name / "best.pt")["model"])
        student.eval()
        history, times = history_batch(split, np.arange(split.num_users), "valid", 16)
        with torch.no_grad():
            scores = student.score_all(history, times)
        ranks[name] = float((scores > scores[:, [favourite]]).sum(dim=1).float().mean())
    assert ranks["distilled"] < 0.2 * ranks["alone"], ranks


def test_teacher_lists_that_do_not_fit_the_data_are_refused_with_the_option_named(tmp_path):
    config = parse_config(TINY)
    _, split = prepare_split(config.data)
    with pytest.raises(FileNotFoundError, match=r"train\.distill\.teacher"):
        TeacherLists.load(tmp_path / "missing.npz", split)
    TeacherLists(np.zeros((3, 2), dtype=np.int64), "x").save(tmp_path / "small.npz")
    with pytest.raises(ValueError, match="do not fit"):
        TeacherLists.load(tmp_path / "small.npz", split)
    federated = parse_config(TINY_HSTU_FEDERATION | {"train": {"distill": {"teacher": "t.npz"}}})
    with pytest.raises(ValueError, match=r"train\.distill.*centralized"):
        initial_federated_model(federated, population_of(federated).publish(tmp_path), tmp_path)
    bad = copy.deepcopy(TINY)
    bad["train"]["distill"] = {"teacher": "t.npz", "top_k": 0}
    with pytest.raises(Exception, match=r"train\.distill"):
        parse_config(bad)
