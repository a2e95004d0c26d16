"""Zero-shot recommendation from titles: the catalogue trie, and constrained beam search
(prompt read once, its cache copied to the beams) against every title scored one by one."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.config import parse_config
from fedrec.data import prepare_split
from fedrec.evaluation.evaluator import evaluate, popularity_scorer
from fedrec.llm_rec.zero_shot import TitleTrie, ZeroShotRecommender, readable_title
from fedrec.privacy_audit import load_model, run_config
from fedrec.training import model_scorer

TITLES = ["Toy Story", "Heat", "Heat", "Toy Soldiers", "Casino", "Babe", "Clueless", "Up"]


def byte_level_lm(lines: list[str], seed: int = 0):  # type: ignore[no-untyped-def]
    """A GPT-2-style byte-level BPE tokenizer (newline is one token, as in SmolLM2) trained on
    ``lines``, and a random two-layer Llama with grouped-query attention over it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([line + "\n" for line in lines] * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def test_readable_title_moves_trailing_articles_and_adds_the_year():
    assert readable_title("Ice Storm, The", "1997") == "The Ice Storm (1997)"
    assert readable_title("Enfer, L'", "1994") == "L'Enfer (1994)"
    assert readable_title("Heat", "") == "Heat"
    assert readable_title("Heat", "unknown") == "Heat"
    assert readable_title("Theatre, The Movie", "1990") == "Theatre, The Movie (1990)"


def test_trie_prunes_seen_items_and_maps_shared_titles_to_every_item():
    end = 0
    trie = TitleTrie([[1, 2], [3], [3], [1, 4]], end)
    assert trie.items_of[(3, end)] == [1, 2]
    assert trie.allowed((), {}) == [1, 3]
    seen = trie.seen_counts({0})
    assert trie.allowed((), seen) == [1, 3]
    assert trie.allowed((1,), seen) == [4]  # item 0's branch is gone
    seen = trie.seen_counts({0, 3})
    assert trie.allowed((), seen) == [3]
    assert trie.allowed((3,), trie.seen_counts({1})) == [end]  # item 2 shares the line
    assert trie.allowed((3,), trie.seen_counts({1, 2})) == [end]  # nothing left: end only
    assert trie.allowed((9, 9), {}) == [end]  # outside the trie
    with pytest.raises(ValueError, match="end token"):
        TitleTrie([[1, end, 2]], end)


@torch.no_grad()
def brute_force(recommender: ZeroShotRecommender, history: np.ndarray) -> dict[int, float]:
    """log p(line | prompt) of every unseen item, each line scored on its own, unpadded."""
    prompt = recommender.prompt(history)
    scores = {}
    for item, tokens in enumerate(recommender.line_tokens):
        if item in set(history.tolist()):
            continue
        line = [*tokens, recommender.end]
        ids = torch.tensor([prompt + line])
        logp = recommender.model(ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, len(prompt) :]
        scores[item] = float(logp[len(prompt) - 1 :].gather(1, targets[:, None]).sum())
    return scores


def test_beam_search_over_all_items_equals_scoring_every_title_one_by_one():
    model, tokenizer = byte_level_lm(TITLES)
    recommender = ZeroShotRecommender(model, tokenizer, TITLES, max_items=3)
    # Different lengths (left padding in one batch), a history longer than max_items, and one
    # that holds one of the two "Heat" items, so the other must still be recommended.
    histories = [np.array([0]), np.array([4, 1, 5, 6]), np.array([3, 7])]
    found = recommender.generate(histories, beams=len(TITLES))
    for history, items in zip(histories, found, strict=True):
        expected = brute_force(recommender, history)
        assert {item for item, _ in items} == set(expected)
        for item, score in items:
            assert score == pytest.approx(expected[item], abs=1e-4)
        assert [s for _, s in items] == sorted((s for _, s in items), reverse=True)
    assert 2 in {item for item, _ in found[1]} and 1 not in {item for item, _ in found[1]}
    # Length penalty 1: each line's log-probability over its token count (end included).
    recommender.length_penalty = 1.0
    (per_token,) = recommender.generate(histories[:1], beams=len(TITLES))
    expected = brute_force(recommender, histories[0])
    for item, score in per_token:
        tokens = len(recommender.line_tokens[item]) + 1
        assert score == pytest.approx(expected[item] / tokens, abs=1e-4)
    recommender.length_penalty = 0.0
    # Few-shot: the prompt keeps the last event; the seen items stay excluded.
    (cut,) = recommender.generate([histories[1]], beams=len(TITLES), keep=1)
    expected = brute_force(recommender, histories[1][-1:])
    assert {item for item, _ in cut} == set(expected) - set(histories[1].tolist())
    for item, score in cut:
        assert score == pytest.approx(expected[item], abs=1e-4)


def test_zero_shot_command_writes_every_setting_next_to_popularity(tmp_path):
    raw = {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "data": {
            "source": "synthetic",
            "synthetic": {"num_users": 30, "num_items": 40, "mean_length": 12, "max_length": 20},
        },
        "evaluation": {"ks": [5, 10]},
        "semantic_id": {"cold_start_share": 0.2},
        "llm": {"max_items": 4, "beam_width": 5, "eval_batch_size": 4},
    }
    dataset, split = prepare_split(parse_config(copy.deepcopy(raw)).data)
    from fedrec.llm_rec.zero_shot import catalogue_lines

    model, tokenizer = byte_level_lm(catalogue_lines(dataset.item_features, split.num_items))
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    raw["llm"]["base_model"] = str(tmp_path / "lm")
    (tmp_path / "config.yaml").write_text(json.dumps(raw))
    central = {k: v for k, v in raw.items() if k != "llm"}
    central["model"] = {"name": "sasrec", "max_len": 8, "embedding_dim": 8}
    central["train"] = {"epochs": 1}
    (tmp_path / "central.yaml").write_text(json.dumps(central))
    trained = tmp_path / "sasrec"
    result = CliRunner().invoke(
        app, ["train", "-c", str(tmp_path / "central.yaml"), "--output-dir", str(trained)]
    )
    assert result.exit_code == 0, result.output
    config = str(tmp_path / "config.yaml")
    args = ["--users", "12", "--few-shot", "1", "--baseline", str(trained), "--no-progress"]
    result = CliRunner().invoke(app, ["zero-shot", "-c", config, *args])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(f"results: {tmp_path / 'run' / 'zero_shot.json'}")
    out = json.loads((tmp_path / "run" / "zero_shot.json").read_text())
    assert out["full"]["users"] == out["few_shot"]["users"] == 12
    assert out["cold_start"]["users"] > 0
    experiment = parse_config(copy.deepcopy(raw))
    users = np.sort(np.random.default_rng(0).choice(split.num_users, 12, replace=False))
    popularity = evaluate(popularity_scorer(split), split, "test", experiment.evaluation, users)
    assert out["full"]["popularity"] == pytest.approx(popularity.metrics)
    # The baseline reads the same users' histories, cut to the last event for few-shot.
    model = load_model(trained, run_config(trained), split.num_items)
    for setting, seen_by in (("full", split), ("few_shot", split.recent(1, "test"))):
        scorer = model_scorer(model, seen_by, torch.device("cpu"))
        expected = evaluate(scorer, split, "test", experiment.evaluation, users).metrics
        (measured,) = out[setting]["baselines"].values()
        assert measured == pytest.approx(expected)
    assert "baselines" not in out["cold_start"]
    for name in ("full", "few_shot", "cold_start"):
        assert 0 <= out[name]["model"]["HR@10"] <= 1
        assert out[name]["model"]["HR@5"] <= out[name]["model"]["HR@10"]
    args = ["--stage", "valid", "--length-penalty", "1", "--users", "6", "--no-progress"]
    result = CliRunner().invoke(app, ["zero-shot", "-c", config, *args])
    assert result.exit_code == 0, result.output
    valid = json.loads((tmp_path / "run" / "zero_shot_valid.json").read_text())
    assert (valid["stage"], valid["length_penalty"]) == ("valid", 1.0)
    assert "cold_start" not in valid and valid["full"]["users"] == 6


def test_zero_shot_refuses_a_model_that_was_never_pretrained(tmp_path):
    raw = {"data": {"source": "synthetic"}, "llm": {}}
    (tmp_path / "config.yaml").write_text(json.dumps(raw))
    result = CliRunner().invoke(app, ["zero-shot", "-c", str(tmp_path / "config.yaml")])
    assert result.exit_code != 0
    assert "llm.base_model" in result.output
