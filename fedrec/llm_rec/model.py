"""The LLM recommender: a frozen causal LM, PEFT LoRA adapters, soft prompts, constrained beam
search over semantic-ID codes.

Adapters are PEFT's: ``get_peft_model`` with a ``LoraConfig``; the soft prompts are PEFT's
``PromptEmbedding`` modules initialised from a ``PromptTuningConfig``. We prepend the prompts
ourselves rather than through ``PeftModelForCausalLM``'s prompt tuning because (measured, see
STACK-NOTES) PEFT embeds the virtual tokens once and expands them over the batch, so Opacus
clips the whole batch as one example; here every example looks its prompt up on its own
(batch-shaped indices), which is also what lets one batch mix scenarios (PLATE-style: one
shared prompt per scenario, chosen per request) and carry a personal prompt. PEFT could not
stack a prompt tuner on a LoRA model directly in this version either.

Layout of a request: ``[scenario prompt][personal prompt][<s> item codes …]``; the personal
prompt never leaves the device (``shared_state`` holds LoRA and scenario prompts only).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.llm_rec.backbone import quiet_transformers
from fedrec.llm_rec.config import LLMRecConfig
from fedrec.llm_rec.data import IGNORE, PromptBuilder
from fedrec.semantic_id.retrieval import constrained_search

LORA_PREFIX, SCENARIO_PREFIX, PERSONAL_KEY = "lora.", "scenario.", "personal"


def _prompt_config(tokens: int, dim: int, init: str, base: str = "") -> Any:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=tokens,
        token_dim=dim,
        num_transformer_submodules=1,
        prompt_tuning_init=PromptTuningInit[init],
        base_model_name_or_path=base or None,
    )


def prompt_rows(prompt: nn.Module) -> torch.Tensor:
    """The virtual-token rows of a PEFT ``PromptEmbedding``."""
    return cast(nn.Embedding, prompt.embedding).weight


class LLMRecommender(nn.Module):
    """Frozen backbone + trainable LoRA, scenario prompts and (optionally) a personal prompt."""

    def __init__(self, backbone: Any, builder: PromptBuilder, config: LLMRecConfig, seed: int = 0):
        super().__init__()
        from peft import LoraConfig, TaskType, get_peft_model
        from peft.tuners.prompt_tuning import PromptEmbedding

        self.config = config
        self.builder = builder
        self.vocabulary = builder.vocabulary
        lora = config.lora
        self.peft = get_peft_model(
            backbone,
            LoraConfig(
                task_type=TaskType.CAUSAL_LM,
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
            ),
        )
        words = self.peft.get_input_embeddings()
        dim = words.embedding_dim
        prompts = config.prompts
        with torch.random.fork_rng():  # the prompts' initial rows: the same in every process
            torch.manual_seed(seed)
            self.scenario_prompts = nn.ModuleList(
                PromptEmbedding(_prompt_config(prompts.scenario_tokens, dim, prompts.init), words)
                for _ in range(prompts.num_scenarios if prompts.scenario_tokens else 0)
            )
            self.personal_prompt = (
                PromptEmbedding(_prompt_config(prompts.personal_tokens, dim, prompts.init), words)
                if prompts.personal_tokens
                else None
            )
        self._initial_personal = self.personal_state()

    # What crosses the network, and what stays.
    def shared_state(self) -> dict[str, torch.Tensor]:
        """LoRA and scenario-prompt tensors: everything a client uploads, nothing else."""
        return {k: v.detach().clone() for k, v in self.shared_parameters().items()}

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """``shared_state``'s keys with the parameters behind them (not copies)."""
        from peft import get_peft_model_state_dict

        # PEFT names the LoRA tensors by its own key scheme and hands out state_dict views, not
        # the parameters: match them by storage.
        by_storage = {p.data_ptr(): p for p in self.peft.parameters() if p.requires_grad}
        state = {
            LORA_PREFIX + k: by_storage[v.data_ptr()]
            for k, v in get_peft_model_state_dict(self.peft).items()
        }
        for s, prompt in enumerate(self.scenario_prompts):
            state[f"{SCENARIO_PREFIX}{s}"] = cast(nn.Parameter, prompt_rows(prompt))
        return state

    def load_shared_state(self, state: Mapping[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        expected = set(self.shared_state())
        if set(state) != expected:
            raise ValueError(
                f"adapter tensors do not match this model: missing {sorted(expected - set(state))}"
                f", unexpected {sorted(set(state) - expected)}"
            )
        lora = {k[len(LORA_PREFIX) :]: v for k, v in state.items() if k.startswith(LORA_PREFIX)}
        set_peft_model_state_dict(self.peft, lora)
        with torch.no_grad():
            for s, prompt in enumerate(self.scenario_prompts):
                prompt_rows(prompt).copy_(state[f"{SCENARIO_PREFIX}{s}"])

    def personal_state(self) -> dict[str, torch.Tensor]:
        if self.personal_prompt is None:
            return {}
        return {PERSONAL_KEY: prompt_rows(self.personal_prompt).detach().clone()}

    def load_personal_state(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """A user's own prompt, or (``None``) the initial one every new user starts from."""
        if self.personal_prompt is None:
            return
        with torch.no_grad():
            prompt_rows(self.personal_prompt).copy_((state or self._initial_personal)[PERSONAL_KEY])

    def history_personal_state(self, items: np.ndarray) -> dict[str, torch.Tensor]:
        """A personal prompt read off a history: row j is the mean input embedding of the
        level-(j mod levels) code tokens of ``items``, so a new user's prompt starts where their
        items sit in the backbone's token space rather than at the rows every user shares."""
        if self.personal_prompt is None:
            return {}
        if not len(items):
            return dict(self._initial_personal)
        codes = torch.as_tensor(self.vocabulary.tokens[items], dtype=torch.long)  # [n, levels]
        rows = self.config.prompts.personal_tokens
        levels = torch.arange(rows) % codes.shape[1]
        words = self.peft.get_input_embeddings().weight.detach()
        return {
            PERSONAL_KEY: words[codes[:, levels]].mean(dim=0).to(prompt_rows(self.personal_prompt))
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # Forward passes.
    def _inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, scenario: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        batch, device = input_ids.shape[0], input_ids.device
        parts: list[torch.Tensor] = []
        if len(self.scenario_prompts):
            n = self.config.prompts.scenario_tokens
            # Batch-shaped (repeated, not expanded) indices: Opacus then sees each example's
            # own lookup of its prompt.
            index = torch.arange(n, device=device).repeat(batch, 1)
            every = torch.stack([p(index) for p in self.scenario_prompts])  # [S, B, n, d]
            parts.append(every[scenario, torch.arange(batch, device=device)])
        if self.personal_prompt is not None:
            n = self.config.prompts.personal_tokens
            parts.append(self.personal_prompt(torch.arange(n, device=device).repeat(batch, 1)))
        words = self.peft.get_input_embeddings()(input_ids)
        prefix = sum(p.shape[1] for p in parts)
        embeds = torch.cat([*parts, words.to(parts[0].dtype if parts else words.dtype)], dim=1)
        mask = torch.cat(
            [torch.ones(batch, prefix, dtype=attention_mask.dtype, device=device), attention_mask],
            dim=1,
        )
        return embeds, mask, prefix

    @staticmethod
    def positions(mask: torch.Tensor) -> torch.Tensor:
        """Position ids counted from each row's first real token, as ``generate`` does."""
        return (mask.cumsum(dim=1) - 1).clamp(min=0)

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, scenario: torch.Tensor
    ) -> torch.Tensor:
        """Next-token logits at the token positions (after the prompts), ``[B, T, V]``."""
        embeds, mask, prefix = self._inputs(input_ids, attention_mask, scenario)
        out = self.peft(
            inputs_embeds=embeds, attention_mask=mask, position_ids=self.positions(mask)
        )
        return out.logits[:, prefix:]

    def per_example_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        scenario: torch.Tensor,
    ) -> torch.Tensor:
        """Mean next-token loss over each example's code tokens, ``[B]``: what DP-SGD clips."""
        logits = self.logits(input_ids, attention_mask, scenario)[:, :-1]
        target = labels[:, 1:]
        losses = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            target.reshape(-1),
            ignore_index=IGNORE,
            reduction="none",
        ).view(target.shape)
        counted = (target != IGNORE).sum(dim=1).clamp(min=1)
        return losses.sum(dim=1) / counted

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        scenario: torch.Tensor,
        beams: int,
    ) -> list[list[tuple[int, float]]]:
        """Up to ``beams`` (item, log-probability) per request from transformers' beam search,
        constrained to valid codes by the prefix trie; ``beams = 1`` is constrained greedy."""
        self.eval()
        embeds, mask, _ = self._inputs(input_ids, attention_mask, scenario)
        return constrained_search(
            self.peft,
            self.vocabulary,
            beams,
            self.builder.pad,
            inputs_embeds=embeds,
            attention_mask=mask,
        )

    def top_unseen(
        self, items: np.ndarray, times: np.ndarray, k: int, num_items: int
    ) -> list[tuple[int, float]]:
        """The ``k`` best (item, log-probability) after the history ``items`` (at ``times``),
        none of them in it: the beam widens until ``k`` unseen items come out."""
        prompt = self.builder.prompt(items)
        scenario = torch.tensor([self.builder.scenario(times)])
        seen = set(items.tolist())
        beams, top = max(self.config.beam_width, k), list[tuple[int, float]]()
        while len(top) < k and beams <= 2 * num_items:
            found = self.generate(
                torch.tensor([prompt]),
                torch.ones(1, len(prompt), dtype=torch.long),
                scenario,
                min(beams, num_items),
            )[0]
            top = [(i, s) for i, s in found if i not in seen][:k]
            beams *= 2
        return top

    def save_global(self, folder: Path, base_model: str) -> None:
        """The global adapters in PEFT's own format: ``lora/`` loads with
        ``PeftModel.from_pretrained(backbone, folder / "lora")``; ``scenario-S/`` is a prompt-
        tuning adapter of the LoRA-merged backbone (``merge_and_unload()`` first)."""
        with quiet_transformers():
            self._save_global(folder, base_model)

    def _save_global(self, folder: Path, base_model: str) -> None:
        from peft import get_peft_model

        self.peft.save_pretrained(str(folder / "lora"))
        if not len(self.scenario_prompts):
            return
        merged = copy.deepcopy(self.peft).merge_and_unload()
        dim = self.peft.get_input_embeddings().embedding_dim
        for s, prompt in enumerate(self.scenario_prompts):
            tokens = self.config.prompts.scenario_tokens
            wrapped = get_peft_model(
                copy.deepcopy(merged),
                _prompt_config(tokens, dim, self.config.prompts.init, base_model),
            )
            with torch.no_grad():
                prompt_rows(wrapped.prompt_encoder["default"]).copy_(prompt_rows(prompt))
            wrapped.save_pretrained(str(folder / f"scenario-{s}"))


def score_matrix(found: list[list[tuple[int, float]]], num_items: int) -> torch.Tensor:
    """Scores over all items from beam results: an item's log-probability where the beam
    found it (its best, when beams that ran out of live tokens repeat it with a worse score),
    -inf elsewhere. Under the full-ranking evaluator (history excluded, pessimistic ties) the
    target's rank is its place among the generated items, a miss beyond them."""
    scores = torch.full((len(found), num_items), -torch.inf)
    for row, items in enumerate(found):
        for item, score in items:
            scores[row, item] = max(float(scores[row, item]), score)
    return scores


def example_losses(model: LLMRecommender, *batch: torch.Tensor) -> torch.Tensor:
    """``dp_train``'s per-example loss for a batch of ``PromptBuilder.records``."""
    return model.per_example_loss(*batch)


def global_state(folder: Path, scenarios: int) -> dict[str, torch.Tensor]:
    """``shared_state`` read back from the PEFT folders ``save_global`` wrote."""
    from peft.utils import load_peft_weights

    state = {LORA_PREFIX + k: v for k, v in load_peft_weights(str(folder / "lora")).items()}
    for s in range(scenarios):
        prompt = load_peft_weights(str(folder / f"scenario-{s}"))["prompt_embeddings"]
        state[f"{SCENARIO_PREFIX}{s}"] = prompt
    return state
