"""The causal LM under the adapters: any Hugging Face model by path or hub id, or a small Llama
built from a config with a BPE tokenizer trained on the catalogue; semantic-ID tokens added.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fedrec.llm_rec.config import BackboneConfig
from fedrec.pretrained import load_causal_lm
from fedrec.semantic_id.retrieval import CodeVocabulary

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-shard progress bars or deprecation chatter while loading and saving models (a
    simulated client loads its backbone once per process; the bars would flood the log)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def code_token_names(levels: int, codebook_size: int, extra_vocab: int) -> list[str]:
    """``<sid_L_C>`` for code C of level L; the last level (collision index) has
    ``extra_vocab`` entries."""
    return [
        f"<sid_{level}_{code}>"
        for level in range(levels)
        for code in range(extra_vocab if level == levels - 1 else codebook_size)
    ]


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A BPE tokenizer (``tokenizers``) trained on catalogue text, wrapped as a transformers
    fast tokenizer so that ``save_pretrained``/``AutoTokenizer`` handle it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def add_code_tokens(tokenizer: Any, codes: np.ndarray, codebook_size: int, extra: int) -> int:
    """Append the code tokens to ``tokenizer``; returns the id of the first (they are
    contiguous)."""
    names = code_token_names(codes.shape[1], codebook_size, extra)
    tokenizer.add_tokens(names, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError("the tokenizer already holds some semantic-ID tokens, out of order")
    return int(ids[0])


def tiny_llama(config: BackboneConfig, vocab_size: int, tokenizer: Any, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(llama)


def title_code_embeddings(
    embeddings: torch.Tensor, title_ids: list[list[int]], item_tokens: np.ndarray
) -> dict[int, torch.Tensor]:
    """Code token -> the mean, over the items whose code holds it, of the mean row of
    ``embeddings`` over the item's title tokens (items without title tokens left out).

    Why: the code tokens are new to a pretrained model. Started all alike (transformers'
    mean resizing), they mean nothing to it until alignment has separated them, which takes
    many epochs on a CPU; started from their items' titles, a code already points where the
    model reads those films (as LC-Rec and TIGER-style LLM recommenders initialise new tokens
    from their descriptions)."""
    rows: dict[int, list[torch.Tensor]] = {}
    for ids, tokens in zip(title_ids, item_tokens.tolist(), strict=True):
        if not ids:
            continue
        title = embeddings[ids].mean(dim=0)
        for token in tokens:
            rows.setdefault(token, []).append(title)
    return {token: torch.stack(r).mean(dim=0) for token, r in rows.items()}


def init_code_embeddings(
    model: Any, tokenizer: Any, vocabulary: CodeVocabulary, titles: list[str], max_title: int
) -> int:
    """Set the code tokens' input rows (and output rows, when untied) by
    ``title_code_embeddings``; returns how many tokens were set."""
    title_ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_title] for t in titles]
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != tables[0].data_ptr():
        tables.append(output.weight)
    with torch.no_grad():
        for table in tables:
            rows = title_code_embeddings(table, title_ids, vocabulary.tokens)
            for token, row in rows.items():
                table[token] = row
    return len(rows)


def new_backbone(
    base_model: str,
    config: BackboneConfig,
    texts: list[str],
    codes: np.ndarray,
    codebook_size: int,
    extra_vocab: int,
    seed: int,
) -> tuple[Any, Any, CodeVocabulary]:
    """(model, tokenizer, code vocabulary) before the foundation stage."""
    if base_model:
        model, tokenizer = load_causal_lm(base_model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.bos_token is None:
            tokenizer.bos_token = tokenizer.eos_token or tokenizer.unk_token
        first = add_code_tokens(tokenizer, codes, codebook_size, extra_vocab)
        model.resize_token_embeddings(len(tokenizer))
    else:
        tokenizer = train_tokenizer(texts, config.text_vocab)
        first = add_code_tokens(tokenizer, codes, codebook_size, extra_vocab)
        model = tiny_llama(config, len(tokenizer), tokenizer, seed)
    return model, tokenizer, CodeVocabulary(codes, codebook_size, extra_vocab, first)
