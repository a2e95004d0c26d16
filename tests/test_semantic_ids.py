"""Semantic IDs: content encoders, RQ-VAE codes and their artefact, constrained generative
retrieval (never an invalid code; beam width 1 = greedy), cold start, the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.config import load_config
from fedrec.data import SyntheticConfig, generate_synthetic, leave_one_out, prepare_split
from fedrec.data.preprocess import PreprocessConfig, preprocess
from fedrec.models import build_model as build_recommender
from fedrec.models.hstu import HSTUConfig
from fedrec.semantic_id.content import (
    ContentConfig,
    content_embeddings,
    hf_embeddings,
    item_texts,
)
from fedrec.semantic_id.retrieval import (
    BOS,
    CodeVocabulary,
    RetrievalConfig,
    build_model,
    evaluate_retrieval,
    generate_items,
    train_retrieval,
    training_windows,
)
from fedrec.semantic_id.rqvae import (
    RQVAEConfig,
    SemanticIds,
    build_semantic_ids,
    code_report,
    disambiguate,
)

SMALL_RQ = RQVAEConfig(levels=2, codebook_size=16, latent_dim=8, hidden_dims=(32,), epochs=30)
SMALL_GPT = RetrievalConfig(
    max_items=6, embedding_dim=32, num_layers=1, num_heads=2, epochs=2, beam_width=6, top_k=5
)


@pytest.fixture(scope="module")
def data():
    dataset = preprocess(
        generate_synthetic(SyntheticConfig(num_users=60, num_items=120, mean_length=12, seed=1)),
        PreprocessConfig(),
    )
    return dataset, leave_one_out(dataset)


@pytest.fixture(scope="module")
def coded(data):
    dataset, _ = data
    embeddings = content_embeddings(dataset, ContentConfig(encoder="tfidf", dim=16))
    ids, model = build_semantic_ids(embeddings, SMALL_RQ, list(dataset.raw_item_ids), False)
    return embeddings, ids, model


def test_disambiguate_by_hand():
    codes = np.array([[1, 2], [1, 2], [0, 5], [1, 2]])
    np.testing.assert_array_equal(disambiguate(codes)[:, -1], [0, 1, 0, 2])
    # New items continue after the ones already coded.
    np.testing.assert_array_equal(disambiguate(np.array([[1, 2]]), {(1, 2): 3})[:, -1], [3])


def test_code_report_by_hand():
    report = code_report(np.array([[0, 1], [0, 1], [1, 0], [2, 1]]), codebook_size=4)
    assert report["levels"][0]["usage"] == 0.75 and report["levels"][1]["usage"] == 0.5
    assert report["levels"][1]["perplexity"] == pytest.approx(
        np.exp(-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)))
    )
    assert report["collision_rate"] == 0.5 and report["unique_codes"] == 3
    assert report["items_per_prefix"] == [4 / 3, 4 / 3]


def assert_report_counts(ids: SemanticIds) -> None:
    """The code report and the extra level against a direct count over the saved codes."""
    base = [tuple(code[:-1]) for code in ids.codes.tolist()]
    n = len(base)
    shared = sum(1 for code in base if base.count(code) > 1)
    assert ids.report["items"] == n
    assert ids.report["collision_rate"] == pytest.approx(shared / n, abs=1e-12)
    assert ids.report["unique_codes"] == len(set(base))
    assert ids.report["max_items_per_code"] == max(base.count(code) for code in base)
    for level, stats in enumerate(ids.report["levels"]):
        used = {code[level] for code in base}
        assert stats["usage"] == pytest.approx(len(used) / ids.codebook_size, abs=1e-12)
    # The extra level numbers the items sharing a code 0, 1, ... in item order.
    assert [code[-1] for code in ids.codes.tolist()] == [
        base[:i].count(code) for i, code in enumerate(base)
    ]
    assert ids.extra_size == ids.report["extra_level_size"] == ids.report["max_items_per_code"]


def brute_force_retrieval(model, vocabulary, split, stage, config, batch_size=32):
    """HR@K / NDCG@K from the generated items, one user at a time: drop the user's history
    and repeats, keep the first K, rank = the target's position (1-based), a miss otherwise."""
    users = np.arange(split.num_users)
    hits, gains = [], []
    for lo in range(0, len(users), batch_size):  # the batches evaluate_retrieval decodes
        histories = [split.history(int(u), stage)[0] for u in users[lo : lo + batch_size]]
        for user, history, found in zip(
            users[lo : lo + batch_size],
            histories,
            generate_items(model, vocabulary, histories, config),
            strict=True,
        ):
            listed: list[int] = []
            for item, _ in found:
                if item not in set(history.tolist()) and item not in listed:
                    listed.append(item)
            listed = listed[: config.top_k]
            target = int(split.targets(stage)[user])
            rank = listed.index(target) + 1 if target in listed else None
            hits.append(rank is not None)
            gains.append(0.0 if rank is None else 1.0 / np.log2(rank + 1))
    k = config.top_k
    return {f"HR@{k}": float(np.mean(hits)), f"NDCG@{k}": float(np.mean(gains))}, sum(hits)


def test_codes_are_unique_use_the_codebook_and_round_trip(coded, data, tmp_path):
    dataset, _ = data
    embeddings, ids, model = coded
    assert ids.codes.shape == (dataset.num_items, SMALL_RQ.levels + 1)
    assert len({tuple(c) for c in ids.codes.tolist()}) == dataset.num_items
    assert ids.report["levels"][0]["usage"] >= 0.8  # k-means start + stale-code re-seeding
    assert_report_counts(ids)
    # The reported reconstruction error, recomputed from the trained model.
    x = model.standardise(embeddings)
    with torch.no_grad():
        reconstruction = model(x)[0]
    mse = float(((reconstruction - x) ** 2).mean())
    assert ids.report["reconstruction_mse"] == pytest.approx(mse, rel=1e-6)
    assert mse < 1.0  # better than decoding every item to the catalogue mean
    np.testing.assert_array_equal(model.codes(embeddings), ids.codes[:, :-1])  # deterministic
    loaded = SemanticIds.load(ids.save(tmp_path / "ids"))
    np.testing.assert_array_equal(loaded.codes, ids.codes)
    assert (
        loaded.report == json.loads(json.dumps(ids.report))
        and loaded.raw_item_ids == ids.raw_item_ids
    )
    meta = json.loads((tmp_path / "ids" / "semantic_ids.json").read_text())
    meta["version"] = "fedrec-semantic-ids/0"
    (tmp_path / "ids" / "semantic_ids.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="rebuild it"):
        SemanticIds.load(tmp_path / "ids")


def test_items_sharing_a_prefix_share_content(coded, data):
    dataset, _ = data
    _, ids, _ = coded
    genres = dataset.item_features["genres"]
    first = [g.split()[0] for g in genres]
    same_prefix, random_pair = [], []
    rng = np.random.default_rng(0)
    for i in range(dataset.num_items):
        peers = np.flatnonzero(ids.codes[:, 0] == ids.codes[i, 0])
        peers = peers[peers != i]
        if len(peers):
            same_prefix.append(first[i] == first[int(rng.choice(peers))])
        random_pair.append(first[i] == first[int(rng.integers(dataset.num_items))])
    assert np.mean(same_prefix) > 2 * np.mean(random_pair) + 0.05


def test_hf_encoder_mean_pools_a_local_model(data, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    dataset, _ = data
    texts = item_texts(dataset)
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"])
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "tiny")
    config = BertConfig(
        vocab_size=fast.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    BertModel(config).save_pretrained(tmp_path / "tiny")
    out = content_embeddings(
        dataset, ContentConfig(encoder="hf", model=str(tmp_path / "tiny"), batch_size=32)
    )
    assert out.shape == (dataset.num_items, 16) and np.isfinite(out).all()
    # Padding is masked: an item embedded alone equals its row from a padded batch.
    alone = hf_embeddings(texts[:1], str(tmp_path / "tiny"), batch_size=1, max_length=32)
    np.testing.assert_allclose(alone[0], out[0], atol=1e-5)


def test_collab_and_hybrid_encoders_read_a_checkpoint(data, tmp_path):
    dataset, split = data
    model = build_recommender("hstu", split.num_items, HSTUConfig(max_len=8, embedding_dim=12))
    torch.save({"model": model.state_dict()}, tmp_path / "best.pt")
    collab = content_embeddings(
        dataset, ContentConfig(encoder="collab", checkpoint=str(tmp_path / "best.pt"))
    )
    np.testing.assert_allclose(collab, model.item_embedding.weight[1:].detach().numpy())
    hybrid = content_embeddings(
        dataset, ContentConfig(encoder="hybrid", dim=8, checkpoint=str(tmp_path / "best.pt"))
    )
    assert hybrid.shape == (dataset.num_items, 8 + 12)
    with pytest.raises(ValueError, match=r"needs content\.checkpoint"):
        ContentConfig(encoder="collab")


def _greedy(model, vocabulary, history, config):
    """Oracle: constrained greedy decoding, one token at a time."""
    ids = torch.tensor([vocabulary.history_tokens(history, config.max_items)])
    prefix: tuple[int, ...] = ()
    for _ in range(vocabulary.levels):
        logits = model(input_ids=ids).logits[0, -1]
        allowed = vocabulary.allowed(prefix)
        token = allowed[int(logits[allowed].argmax())]
        prefix += (token,)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return vocabulary.item_of[prefix]


def test_constrained_beam_search_returns_valid_items_and_width_one_is_greedy(coded, data):
    _, split = data
    _, ids, _ = coded
    vocabulary = CodeVocabulary(ids.codes, ids.codebook_size, ids.extra_size + 4)
    model = build_model(vocabulary, SMALL_GPT).eval()  # untrained: any token is likely
    histories = [split.history(u, "test")[0] for u in range(8)]
    found = generate_items(model, vocabulary, histories, SMALL_GPT)
    for items in found:
        assert len(items) == SMALL_GPT.beam_width and len({i for i, _ in items}) == len(items)
        assert all(0 <= i < split.num_items for i, _ in items)
        scores = [s for _, s in items]
        assert scores == sorted(scores, reverse=True)
    greedy = generate_items(model, vocabulary, histories, SMALL_GPT, beams=1)
    assert [g[0][0] for g in greedy] == [
        _greedy(model, vocabulary, h, SMALL_GPT) for h in histories
    ]


def test_retrieval_learns_and_is_measured(coded, data):
    _, split = data
    _, ids, _ = coded
    vocabulary = CodeVocabulary(ids.codes, ids.codebook_size, ids.extra_size)
    windows = training_windows(split, vocabulary, SMALL_GPT.max_items)
    assert all(w[0] == BOS and (len(w) - 1) % vocabulary.levels == 0 for w in windows)
    model = build_model(vocabulary, SMALL_GPT)
    losses = train_retrieval(model, windows, SMALL_GPT, progress=False)
    assert losses[-1] < losses[0]
    # A list long enough to hold some targets (two epochs rarely put one in the top 5), so
    # the comparison is not between zeros.
    wide = dataclasses.replace(SMALL_GPT, beam_width=40, top_k=40)
    for config, least_hits in ((SMALL_GPT, 0), (wide, 1)):
        result = evaluate_retrieval(model, vocabulary, split, "test", config)
        expected, hits = brute_force_retrieval(model, vocabulary, split, "test", config)
        assert set(result["metrics"]) == set(expected)
        for name, value in expected.items():
            assert result["metrics"][name] == pytest.approx(value, abs=1e-9), name
        assert hits >= least_hits
        assert result["users"] == split.num_users


def test_cli_builds_codes_and_reports_cold_start(tmp_path):
    config = {
        "output_dir": str(tmp_path / "run"),
        "data": {
            "source": "synthetic",
            "synthetic": {"num_users": 50, "num_items": 80, "mean_length": 10, "seed": 2},
        },
        "semantic_id": {
            "content": {"encoder": "tfidf", "dim": 12},
            "rqvae": {
                "levels": 2,
                "codebook_size": 8,
                "latent_dim": 6,
                "hidden_dims": [16],
                "epochs": 10,
            },
            "retrieval": {
                "max_items": 5,
                "embedding_dim": 16,
                "num_layers": 1,
                "num_heads": 2,
                "epochs": 1,
                "beam_width": 10,
            },
            "cold_start_share": 0.1,
        },
    }
    path = tmp_path / "sid.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["semantic-ids", "-c", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "cold start" in result.output and "users/s" in result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["cold_start"]["cold_items"] == round(0.1 * results["items"])
    assert set(results["retrieval"]["test"]["metrics"]) == {"HR@10", "NDCG@10"}
    saved = SemanticIds.load(tmp_path / "run" / "semantic_ids")
    assert saved.codes.shape == (results["items"], 3)
    assert len({tuple(code) for code in saved.codes.tolist()}) == results["items"]
    assert results["codes"] == saved.report
    assert_report_counts(saved)
    dataset, split = prepare_split(load_config(path).data)
    assert results["items"] == dataset.num_items == split.num_items
    for stage in ("valid", "test"):
        assert results["retrieval"][stage]["users"] == split.num_users
    # Popularity ranks never-seen items after every other candidate (ties are pessimistic), so
    # on users whose test item is cold it never lists it.
    assert results["cold_start"]["popularity"] == {"HR@10": 0.0, "NDCG@10": 0.0}


def test_new_items_take_their_slots_next_to_generated_items_sharing_the_prefix():
    from fedrec.semantic_id.retrieval import _prefix, _top_k

    codes = np.array([[0, 0, 0], [0, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 0]])
    vocabulary = CodeVocabulary(codes, codebook_size=2, extra_vocab=2)
    config = RetrievalConfig(top_k=3, beam_width=3, new_item_slots=1, new_item_prefix=1)
    new = {}
    for item in (3, 4):  # new item 3 shares item 0's first token, item 4 item 2's
        new.setdefault(_prefix(vocabulary, item, config), []).append(item)
    found = [(0, -0.1), (2, -0.2), (1, -0.3)]
    assert _top_k(found, set(), new, vocabulary, config) == [0, 3, 2]  # one slot only
    assert _top_k(found, {3}, new, vocabulary, config) == [0, 2, 4]  # seen items never listed
    assert _top_k(found, set(), {}, vocabulary, config) == [0, 2, 1]


def test_the_funnels_semantic_id_source_is_the_beam_search_without_seen_items(coded, data):
    from fedrec.serving.sources import generative_source

    _, split = data
    _, ids, _ = coded
    vocabulary = CodeVocabulary(ids.codes, ids.codebook_size, ids.extra_size + 4)
    model = build_model(vocabulary, SMALL_GPT).eval()
    visible = split.visible("test")
    users = np.arange(6)
    items, scores = generative_source(model, vocabulary, SMALL_GPT, n=6, batch=4)(visible, users)
    beams = generate_items(model, vocabulary, [visible.full(u)[0] for u in users], SMALL_GPT, 6)
    for row, user in enumerate(users):
        seen = set(visible.full(user)[0].tolist())
        kept = [(i, s) for i, s in beams[row] if i not in seen]
        assert items[row, : len(kept)].tolist() == [i for i, _ in kept]
        np.testing.assert_allclose(scores[row, : len(kept)], [s for _, s in kept], rtol=1e-5)
        assert (items[row, len(kept) :] == -1).all()
