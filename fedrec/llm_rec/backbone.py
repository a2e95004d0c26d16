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
