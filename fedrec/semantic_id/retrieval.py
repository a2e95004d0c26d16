"""Generative retrieval over semantic-ID tokens (TIGER-style, decoder-only).

A small transformers GPT-2 reads a user's recent items as their code tokens and generates the
next item's code; transformers' beam search, constrained by ``prefix_allowed_tokens_fn`` to a
prefix trie of valid codes, returns top-K items that always exist. Token layout: 0 = padding,
1 = start, then ``codebook_size`` tokens per level and ``extra_vocab`` tokens for the extra
(collision) level; the LLM recommender reuses this token space.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fedrec.data.split import SequenceSplit, Stage
from fedrec.evaluation.metrics import rank_metrics

PAD, BOS, FIRST_CODE_TOKEN = 0, 1, 2


@dataclass
class RetrievalConfig:
    max_items: int = 20  # history items the model reads
    embedding_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.1
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    beam_width: int = 20
    top_k: int = 10
    # Cold start as in TIGER: up to ``new_item_slots`` of the top-K go to new items (never seen
    # in training) that share the first ``new_item_prefix`` tokens with a generated item. One
    # token: with 256 first-level codes, deeper prefixes rarely hold any of a few new items.
    new_item_slots: int = 3
    new_item_prefix: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.beam_width < self.top_k or self.top_k < 1:
            raise ValueError("retrieval: beam_width >= top_k >= 1")
        if min(self.max_items, self.num_layers, self.num_heads, self.epochs, self.batch_size) < 1:
            raise ValueError("retrieval: sizes, epochs and batch_size must be >= 1")
        if not 0 <= self.new_item_slots <= self.top_k or self.new_item_prefix < 1:
            raise ValueError("retrieval: 0 <= new_item_slots <= top_k, new_item_prefix >= 1")
        if self.embedding_dim % self.num_heads:
            raise ValueError("retrieval.embedding_dim must be a multiple of num_heads")


class CodeVocabulary:
    """Item codes ⇄ token ids, and the prefix trie of valid codes. Code tokens are contiguous
    from ``first_token`` (the LLM recommender appends them to a text vocabulary)."""

    def __init__(
        self,
        codes: np.ndarray,
        codebook_size: int,
        extra_vocab: int,
        first_token: int = FIRST_CODE_TOKEN,
    ):
        if codes[:, -1].max() >= extra_vocab:
            raise ValueError(
                f"extra level needs {codes[:, -1].max() + 1} tokens, has {extra_vocab}"
            )
        self.codebook_size, self.extra_vocab = codebook_size, extra_vocab
        self.levels = codes.shape[1]
        self.offsets = first_token + codebook_size * np.arange(self.levels)
        self.size = first_token + codebook_size * (self.levels - 1) + extra_vocab
        self.tokens = codes + self.offsets  # [items, levels]
        self.item_of = {tuple(t): i for i, t in enumerate(self.tokens.tolist())}
        if len(self.item_of) != len(codes):
            raise ValueError("semantic IDs are not unique; add the extra level (disambiguate)")
        self.trie: dict[tuple[int, ...], list[int]] = {}
        for row in self.tokens.tolist():
            for depth in range(self.levels):
                self.trie.setdefault(tuple(row[:depth]), []).append(row[depth])
        self.trie = {k: sorted(set(v)) for k, v in self.trie.items()}

    def allowed(self, prefix: tuple[int, ...]) -> list[int]:
        return self.trie.get(prefix, [PAD])  # a complete code: nothing more (never reached)

    def history_tokens(self, items: np.ndarray, max_items: int) -> list[int]:
        return [BOS, *self.tokens[items[-max_items:]].reshape(-1).tolist()]


def build_model(vocabulary: CodeVocabulary, config: RetrievalConfig) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    gpt = GPT2Config(
        vocab_size=vocabulary.size,
        n_positions=1 + (config.max_items + 1) * vocabulary.levels,
        n_embd=config.embedding_dim,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=BOS,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    gpt.loss_type = "ForCausalLM"  # named, or transformers warns for every model it builds
    return GPT2LMHeadModel(gpt)


def training_windows(
    split: SequenceSplit, vocabulary: CodeVocabulary, max_items: int, skip: np.ndarray | None = None
) -> list[list[int]]:
    """Each user's training history cut into windows of ``max_items + 1`` items (the last
    window overlapping the previous), as token lists; items in ``skip`` are removed first."""
    windows = []
    for user in range(split.num_users):
        items = split.train_sequence(user)[0]
        if skip is not None:
            items = items[~np.isin(items, skip)]
        for end in range(len(items), 1, -(max_items + 1)):
            start = end - max_items - 1
            if start <= 0:  # the earliest window: full length, overlapping the next one
                start, end = 0, min(len(items), max_items + 1)
            windows.append(vocabulary.history_tokens(items[start:end], max_items + 1))
    return windows


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def train_retrieval(
    model: Any, windows: list[list[int]], config: RetrievalConfig, progress: bool = True
) -> list[float]:
    """Next-token training on all code tokens of every window; mean loss per epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    rng = np.random.default_rng(config.seed)
    losses = []
    model.train()
    for _ in tqdm(range(config.epochs), desc="retrieval", disable=not progress, leave=False):
        order, total = rng.permutation(len(windows)), []
        for lo in range(0, len(order), config.batch_size):
            ids, mask = _left_padded([windows[i] for i in order[lo : lo + config.batch_size]])
            labels = ids.masked_fill(mask == 0, -100)
            labels[ids == BOS] = -100
            # Positions counted from each window's first real token, as generate() does for
            # left-padded prompts.
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            loss = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels
            ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total.append(loss.item())
        losses.append(float(np.mean(total)))
    model.eval()
    return losses


def generate_items(
    model: Any,
    vocabulary: CodeVocabulary,
    histories: list[np.ndarray],
    config: RetrievalConfig,
    beams: int | None = None,
) -> list[list[tuple[int, float]]]:
    """For each history, up to ``beams`` (item, score) pairs from constrained beam search, best
    first; ``beams = 1`` is constrained greedy decoding."""
    beams = beams or config.beam_width
    ids, mask = _left_padded([vocabulary.history_tokens(h, config.max_items) for h in histories])
    return constrained_search(
        model,
        vocabulary,
        beams,
        PAD,
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
    )


def prompt_cache(model: Any, beams: int, **inputs: torch.Tensor) -> Any:
    """The key/value cache of every prompt but its last token, read once and copied to each
    beam. transformers' beam search copies each prompt to every beam before reading it, so the
    prompt (most of the tokens) would be read ``beams`` times (measured: 17 s per user on a
    pretrained backbone, against 2–5 s; BENCHMARKS.md, zero-shot); ``generate`` goes on from the
    last token."""
    mask = inputs["attention_mask"]
    head = {name: tensor[:, :-1] for name, tensor in inputs.items()}
    cache = model(
        **head,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, :-1],
        use_cache=True,
        logits_to_keep=1,
    ).cache
    cache.batch_repeat_interleave(beams)
    return cache


def constrained_search(
    model: Any, vocabulary: CodeVocabulary, beams: int, pad: int, **inputs: torch.Tensor
) -> list[list[tuple[int, float]]]:
    """transformers' beam search over ``inputs`` (``input_ids`` or ``inputs_embeds``, and
    ``attention_mask``), constrained by the prefix trie to valid codes: ``beams`` (item,
    log-probability of its code) per request, best first; ``beams = 1`` is constrained greedy."""
    prompt = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0

    def allowed(_batch: int, sequence: torch.Tensor) -> list[int]:
        return vocabulary.allowed(tuple(sequence[prompt:].tolist()))

    with torch.no_grad():
        out = model.generate(
            **inputs,
            cache=prompt_cache(model, beams, **inputs),
            max_new_tokens=vocabulary.levels,
            num_beams=beams,
            num_return_sequences=beams,
            do_sample=False,
            prefix_allowed_tokens_fn=allowed,
            output_scores=True,
            output_logits=beams == 1,
            return_dict_in_generate=True,
            pad_token_id=pad,
            eos_token_id=None,
            **({"length_penalty": 0.0} if beams > 1 else {}),  # scores: sums of log-probs
        )
    generated = out.sequences[:, -vocabulary.levels :]
    if beams > 1:
        scores = out.sequences_scores.tolist()
    else:  # greedy: unconstrained log-probabilities of the chosen tokens, as beam scores are
        steps = torch.stack(out.logits, dim=1).log_softmax(dim=-1)
        scores = steps.gather(2, generated.unsqueeze(-1)).sum(dim=(1, 2)).tolist()
    found: list[list[tuple[int, float]]] = [[] for _ in range(len(generated) // beams)]
    for row, (code, score) in enumerate(zip(generated.tolist(), scores, strict=True)):
        item = vocabulary.item_of.get(tuple(code))
        if item is None:
            raise RuntimeError(f"beam search produced an invalid code {code}")
        found[row // beams].append((item, float(score)))
    return found


def ranked_lists(
    model: Any,
    vocabulary: CodeVocabulary,
    split: SequenceSplit,
    stage: Stage,
    config: RetrievalConfig,
    users: np.ndarray,
    batch_size: int = 32,
    new_items: np.ndarray | None = None,
) -> list[list[int]]:
    """Each of ``users``' top-K items for ``stage`` (its visible history excluded), by the
    constrained beam search; ``new_items`` (cold start) may take ``config.new_item_slots``
    places next to generated items sharing their code prefix."""
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for item in [] if new_items is None else new_items.tolist():
        by_prefix.setdefault(_prefix(vocabulary, item, config), []).append(item)
    lists: list[list[int]] = []
    for lo in range(0, len(users), batch_size):
        histories = [split.history(int(u), stage)[0] for u in users[lo : lo + batch_size]]
        for history, found in zip(
            histories, generate_items(model, vocabulary, histories, config), strict=True
        ):
            lists.append(_top_k(found, set(history.tolist()), by_prefix, vocabulary, config))
    return lists


def evaluate_retrieval(
    model: Any,
    vocabulary: CodeVocabulary,
    split: SequenceSplit,
    stage: Stage,
    config: RetrievalConfig,
    users: np.ndarray | None = None,
    batch_size: int = 32,
    new_items: np.ndarray | None = None,
) -> dict[str, Any]:
    """HR@K / NDCG@K with the full-ranking protocol's conventions: each user's visible history
    is excluded from the list, the target's rank is its position in the generated top-K (a
    miss beyond K). Also users per second of the constrained beam search. ``new_items``: as
    in ``ranked_lists``."""
    users = np.arange(split.num_users) if users is None else np.asarray(users)
    targets = split.targets(stage)
    started = time.perf_counter()
    lists = ranked_lists(model, vocabulary, split, stage, config, users, batch_size, new_items)
    seconds = time.perf_counter() - started
    ranks = np.array(
        [
            listed.index(targets[user]) + 1 if targets[user] in listed else np.inf
            for user, listed in zip(users, lists, strict=True)
        ]
    )
    k = config.top_k
    finite = torch.from_numpy(np.where(np.isfinite(ranks), ranks, 10**9))
    metrics = {
        name: float(v.mean()) for name, v in rank_metrics(finite, (k,)).items() if name != "MRR"
    }
    return {"metrics": metrics, "users": len(users), "users_per_second": len(users) / seconds}


def _prefix(vocabulary: CodeVocabulary, item: int, config: RetrievalConfig) -> tuple[int, ...]:
    return tuple(vocabulary.tokens[item][: config.new_item_prefix].tolist())


def _top_k(
    found: list[tuple[int, float]],
    seen: set[int],
    new_by_prefix: dict[tuple[int, ...], list[int]],
    vocabulary: CodeVocabulary,
    config: RetrievalConfig,
) -> list[int]:
    listed: list[int] = []
    slots = config.new_item_slots if new_by_prefix else 0
    for item, _ in found:
        if item not in seen and item not in listed:
            listed.append(item)
        for new in new_by_prefix.get(_prefix(vocabulary, item, config), []):
            if slots and new not in seen and new not in listed:
                listed.append(new)
                slots -= 1
    return listed[: config.top_k]
