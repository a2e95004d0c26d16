"""Item content embeddings for semantic IDs, from the public item catalogue only.

Encoders (``ContentConfig.encoder``): ``tfidf`` (scikit-learn TF-IDF over title words and genre
tokens, reduced by truncated SVD: meaningful codes without pretrained weights), ``hf`` (mean-
pooled hidden states of any Hugging Face encoder or causal LM, by local path or hub id),
``collab`` (the item table of a trained HSTU/SASRec checkpoint) and ``hybrid`` (``tfidf`` and
``collab`` side by side, each L2-normalised).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedrec.data.catalogue import DEFAULT_TEXT_COLUMNS
from fedrec.data.dataset import InteractionDataset
from fedrec.files import load_checkpoint
from fedrec.pretrained import check_installed, from_pretrained_args

ENCODERS = ("tfidf", "hf", "collab", "hybrid")
TEXT_COLUMNS = DEFAULT_TEXT_COLUMNS


@dataclass
class ContentConfig:
    """``dim``: output size of ``tfidf`` (SVD components). ``model``: for ``hf``, a local path,
    hub id or GGUF file, or ``all-minilm-l6-v2`` (the packaged MiniLM, ``make pretrained``).
    ``checkpoint``: a trained model's ``best.pt``/``checkpoint.pt`` for ``collab``."""

    encoder: str = "tfidf"
    dim: int = 64
    model: str = ""
    checkpoint: str = ""
    batch_size: int = 64
    max_length: int = 32

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"content.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.dim < 2 or self.batch_size < 1 or self.max_length < 4:
            raise ValueError("content: dim >= 2, batch_size >= 1, max_length >= 4")
        if self.encoder == "hf" and not self.model:
            raise ValueError(
                "content.encoder 'hf' needs content.model (a local path, hub id or GGUF file, "
                "or all-minilm-l6-v2)"
            )
        check_installed(self.model)
        if self.encoder in ("collab", "hybrid") and not self.checkpoint:
            raise ValueError(f"content.encoder {self.encoder!r} needs content.checkpoint")


def item_texts(dataset: InteractionDataset) -> list[str]:
    """One line of text per item: its title, genres and year (what the catalogue says)."""
    columns = [dataset.item_features[c] for c in TEXT_COLUMNS if c in dataset.item_features]
    if not columns:
        raise ValueError(
            f"{dataset.name}: items have no text columns ({', '.join(TEXT_COLUMNS)}); "
            "semantic IDs need item content"
        )
    return [" ".join(str(col[i]) for col in columns).strip() for i in range(dataset.num_items)]


def tfidf_embeddings(texts: list[str], dim: int, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    matrix = TfidfVectorizer(
        token_pattern=r"[^\s]+", lowercase=True, sublinear_tf=True
    ).fit_transform(texts)
    dim = min(dim, matrix.shape[1] - 1, matrix.shape[0] - 1)
    return (
        TruncatedSVD(n_components=dim, random_state=seed).fit_transform(matrix).astype(np.float32)
    )


def hf_embeddings(texts: list[str], model_id: str, batch_size: int, max_length: int) -> np.ndarray:
    """Mean-pooled last hidden states (padding masked) of a Hugging Face model."""
    from transformers import AutoModel, AutoTokenizer

    folder, extra = from_pretrained_args(model_id)
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    if tokenizer.pad_token is None:  # causal LMs often ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model = AutoModel.from_pretrained(folder, **extra).eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[lo : lo + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy())
    return np.concatenate(out).astype(np.float32)


def collab_embeddings(checkpoint: str | Path, num_items: int) -> np.ndarray:
    """The item table of a trained sequential model (row 0 is padding and is dropped)."""
    state = load_checkpoint(Path(checkpoint))
    weights = state.get("model", state)["item_embedding.weight"]
    if weights.shape[0] != num_items + 1:
        raise ValueError(
            f"{checkpoint}: item table has {weights.shape[0] - 1} items, the data {num_items}; "
            "train it on the same preprocessed data"
        )
    return weights[1:].numpy().astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def content_embeddings(dataset: InteractionDataset, config: ContentConfig) -> np.ndarray:
    """[items, d] content embeddings of every item of ``dataset`` by the configured encoder."""
    encoders: dict[str, Callable[[], np.ndarray]] = {
        "tfidf": lambda: tfidf_embeddings(item_texts(dataset), config.dim),
        "hf": lambda: hf_embeddings(
            item_texts(dataset), config.model, config.batch_size, config.max_length
        ),
        "collab": lambda: collab_embeddings(config.checkpoint, dataset.num_items),
        "hybrid": lambda: np.concatenate(
            [
                _unit_rows(tfidf_embeddings(item_texts(dataset), config.dim)),
                _unit_rows(collab_embeddings(config.checkpoint, dataset.num_items)),
            ],
            axis=1,
        ),
    }
    return encoders[config.encoder]()
