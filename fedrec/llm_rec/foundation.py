"""The foundation stage, on the server: pretrain the whole backbone on public data before any
client trains adapters.

Data each task uses:
- ``catalogue``: each item's text (title, genres, year) — the public catalogue.
- ``alignment``: "codes → title" and "title → codes" for every item — catalogue only (the
  semantic IDs are built from content, or given as an artefact).
- ``consented``: training sequences of ``foundation.consented_share`` of the users, who agreed
  to share them (0 by default: no user data at all). Their validation and test items are never
  read.
The result is a folder: ``backbone/`` (``save_pretrained`` model and tokenizer),
``semantic_ids/`` (the codes it was trained with) and ``foundation.json`` (what was used).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset
from tqdm import tqdm

from fedrec.data.catalogue import ItemCatalogue
from fedrec.data.dataset import InteractionDataset
from fedrec.data.split import SequenceSplit
from fedrec.llm_rec.backbone import init_code_embeddings, new_backbone, quiet_transformers
from fedrec.llm_rec.config import LLMRecConfig
from fedrec.llm_rec.data import IGNORE, PromptBuilder
from fedrec.llm_rec.model import LLMRecommender
from fedrec.llm_rec.zero_shot import catalogue_lines
from fedrec.semantic_id.content import item_texts
from fedrec.semantic_id.pipeline import SemanticIdConfig, catalogue_codes
from fedrec.semantic_id.retrieval import CodeVocabulary
from fedrec.semantic_id.rqvae import SemanticIds

log = logging.getLogger("fedrec.llm_rec")
VERSION = "fedrec-llm-foundation/1"


def semantic_ids_for(
    llm: LLMRecConfig, semantic_id: SemanticIdConfig, dataset: InteractionDataset
) -> SemanticIds:
    """The configured artefact (checked against the data's items), or codes built now from the
    catalogue with the ``semantic_id`` section (content encoder + RQ-VAE)."""
    if llm.semantic_ids:
        ids = SemanticIds.load(Path(llm.semantic_ids))
        if ids.raw_item_ids and list(ids.raw_item_ids) != [str(i) for i in dataset.raw_item_ids]:
            raise ValueError(
                f"llm.semantic_ids {llm.semantic_ids}: codes are for other items "
                f"({len(ids.raw_item_ids)} vs {dataset.num_items}); rebuild them with "
                "`fedrec semantic-ids` on the same data and preprocessing"
            )
        return ids
    return catalogue_codes(dataset, semantic_id, progress=False)[0]


def catalogue_titles(catalogue: ItemCatalogue, style: str = "catalogue") -> list[str]:
    """Each item's title, else its text (title, genres, year), in index order; ``readable``
    (``llm.title_style``): as ``zero_shot.readable_title`` writes it (items without titles:
    their text either way)."""
    titles = catalogue.item_features.get("title")
    if style == "readable" and titles is not None:
        return catalogue_lines(catalogue.item_features, len(catalogue.raw_item_ids))
    return list(titles) if titles is not None else catalogue.item_texts()


def item_titles(dataset: InteractionDataset, style: str = "catalogue") -> list[str]:
    return catalogue_titles(ItemCatalogue.from_dataset(dataset), style)


def check_title_style(meta: dict[str, Any], config: LLMRecConfig, folder: Path) -> None:
    """Prompts with titles must write them as the foundation's alignment did."""
    aligned = meta.get("title_style", "catalogue")
    if config.with_titles and config.title_style != aligned:
        raise ValueError(
            f"{folder}: this foundation was aligned with {aligned} titles, the run asks for "
            f"{config.title_style}: set llm.title_style: {aligned}, or build a new foundation "
            "(another llm.foundation_dir)"
        )


@dataclass
class Foundation:
    """A loaded foundation folder: what every model of a run is built from."""

    folder: Path
    tokenizer: Any
    vocabulary: CodeVocabulary
    meta: dict[str, Any]

    def builder(self, config: LLMRecConfig, titles: list[str]) -> PromptBuilder:
        """Prompts for items titled ``titles`` (index order; ``item_titles``)."""
        check_title_style(self.meta, config, self.folder)
        tokens = None
        if config.with_titles:
            tokens = [
                self.tokenizer(t, add_special_tokens=False)["input_ids"][: config.title_tokens]
                for t in titles
            ]
        return PromptBuilder(
            self.vocabulary,
            bos=self.tokenizer.bos_token_id,
            pad=self.tokenizer.pad_token_id,
            max_items=config.max_items,
            titles=tokens,
            scenario_rule=config.prompts.scenario_rule,
        )

    def recommender(self, config: LLMRecConfig, titles: list[str], seed: int) -> LLMRecommender:
        """A fresh recommender: the pretrained backbone (frozen) with new adapters."""
        from transformers import AutoModelForCausalLM

        with quiet_transformers():
            backbone = AutoModelForCausalLM.from_pretrained(self.folder / "backbone")
            backbone.config.loss_type = "ForCausalLM"  # named, or transformers warns per model
            return LLMRecommender(backbone, self.builder(config, titles), config, seed)


def load_foundation(folder: Path) -> Foundation:
    from transformers import AutoTokenizer

    meta_path = folder / "foundation.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{folder}: no foundation here; run `fedrec foundation -c CONFIG` (or start the "
            "federated run, whose server builds it first)"
        )
    meta = json.loads(meta_path.read_text("utf-8"))
    if meta.get("version") != VERSION:
        raise ValueError(f"{folder}: foundation version {meta.get('version')!r}, need {VERSION}")
    ids = SemanticIds.load(folder / "semantic_ids")
    vocabulary = CodeVocabulary(
        ids.codes, ids.codebook_size, meta["extra_vocab"], meta["first_code"]
    )
    return Foundation(folder, AutoTokenizer.from_pretrained(folder / "backbone"), vocabulary, meta)


def _text_rows(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[int], int]]:
    rows = []
    for text in texts:
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        ids.append(tokenizer.eos_token_id)
        rows.append((ids, [IGNORE, *ids[1:]], 0))
    return rows


def _alignment_rows(
    tokenizer: Any, vocabulary: CodeVocabulary, titles: list[str], max_title: int
) -> list[tuple[list[int], list[int], int]]:
    rows = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for item, title in enumerate(titles):
        words = tokenizer(title, add_special_tokens=False)["input_ids"][:max_title]
        code = vocabulary.tokens[item].tolist()
        for ids in ([bos, *code, *words, eos], [bos, *words, *code, eos]):
            rows.append((ids, [IGNORE, *ids[1:]], 0))
    return rows


def run_foundation(
    config: LLMRecConfig,
    semantic_id: SemanticIdConfig,
    seed: int,
    dataset: InteractionDataset,
    split: SequenceSplit,
    folder: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain the backbone on public data (see the module docstring) and save it."""
    started = time.perf_counter()
    ids = semantic_ids_for(config, semantic_id, dataset)
    extra = ids.extra_size + semantic_id.extra_vocab_margin
    texts = item_texts(dataset)
    model, tokenizer, vocabulary = new_backbone(
        config.base_model,
        config.backbone,
        texts,
        ids.codes,
        ids.codebook_size,
        extra,
        seed,
    )
    titles = item_titles(dataset, config.title_style)
    if config.code_init == "titles":
        set_rows = init_code_embeddings(model, tokenizer, vocabulary, titles, 16)
        log.info("foundation: %d code tokens start at their items' titles", set_rows)
    rows = {
        "catalogue": _text_rows(tokenizer, texts),
        "alignment": _alignment_rows(tokenizer, vocabulary, titles, 16),
    }
    rng = np.random.default_rng(seed)
    share = config.foundation.consented_share
    consented = np.sort(rng.permutation(split.num_users)[: round(share * split.num_users)])
    builder = PromptBuilder(
        vocabulary, tokenizer.bos_token_id, tokenizer.pad_token_id, config.max_items
    )
    sequences = builder.records(split, consented, config.max_items) if len(consented) else None
    counts = {name: len(r) for name, r in rows.items()}
    counts["consented"] = 0 if sequences is None else len(sequences)
    losses = _pretrain(model, builder, rows, sequences, config, seed, progress)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(folder / "backbone")
        tokenizer.save_pretrained(folder / "backbone")
    ids.save(folder / "semantic_ids")
    meta = {
        "version": VERSION,
        "base_model": config.base_model or "llama built from llm.backbone",
        "title_style": config.title_style,
        "code_init": config.code_init,
        "backbone": asdict(config.backbone),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "first_code": int(vocabulary.offsets[0]),
        "extra_vocab": extra,
        "records": counts,
        "consented_users": consented.tolist(),
        "losses": losses,
        "config": asdict(config.foundation),
        "seconds": time.perf_counter() - started,
    }
    (folder / "foundation.json").write_text(json.dumps(meta, indent=1) + "\n", "utf-8")
    log.info("foundation: %s records, final loss %.3f", counts, losses[-1] if losses else 0)
    return meta


def _pretrain(
    model: Any,
    builder: PromptBuilder,
    rows: dict[str, list[tuple[list[int], list[int], int]]],
    sequences: TensorDataset | None,
    config: LLMRecConfig,
    seed: int,
    progress: bool,
) -> list[float]:
    """Full-parameter next-token training of the backbone; mean loss per epoch."""
    every = [r for part in rows.values() for r in part]
    chunks = [every[i : i + 4096] for i in range(0, len(every), 4096)]
    datasets = [builder.tensors(c) for c in chunks] + ([sequences] if sequences else [])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.foundation.learning_rate)
    epochs = config.foundation.epochs
    steps = epochs * sum(-(-len(d) // config.foundation.batch_size) for d in datasets)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.foundation.learning_rate, total_steps=max(1, steps)
    )
    losses = []
    model.train()
    # Per step, not per epoch: on a pretrained backbone one epoch takes minutes.
    bar = tqdm(total=steps, desc="foundation", disable=not progress, leave=False)
    for _ in range(epochs):
        batches: list[tuple[torch.Tensor, ...]] = [
            tuple(t[order] for t in d.tensors)
            for d in datasets
            for order in torch.randperm(len(d), generator=generator).split(
                config.foundation.batch_size
            )
        ]
        total = []
        for b in torch.randperm(len(batches), generator=generator).tolist():
            ids, mask, labels, _ = batches[b]
            width = int(mask.sum(dim=1).max())  # drop all-padding columns of this batch
            ids, mask, labels = ids[:, -width:], mask[:, -width:], labels[:, -width:]
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=LLMRecommender.positions(mask),
                labels=labels,
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            schedule.step()
            total.append(out.loss.item())
            bar.update()
            bar.set_postfix(loss=f"{total[-1]:.3f}", refresh=False)
        losses.append(float(np.mean(total)))
    bar.close()
    model.eval()
    return losses
