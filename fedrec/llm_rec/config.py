"""Options of the LLM recommender: backbone, adapters, prompts, foundation stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedrec.pretrained import check_installed

SCENARIO_RULES = ("none", "weekend")
PROMPT_INITS = ("SAMPLE_VOCAB", "RANDOM")
PERSONAL_INITS = ("shared", "history")
TITLE_STYLES = ("catalogue", "readable")
CODE_INITS = ("mean", "titles")


@dataclass
class BackboneConfig:
    """The default backbone when ``base_model`` is empty: a small Llama built from a config,
    with a BPE tokenizer of ``text_vocab`` tokens trained on the catalogue text."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 512
    text_vocab: int = 1000

    def __post_init__(self) -> None:
        if min(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size) < 1:
            raise ValueError("llm.backbone: sizes must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError("llm.backbone.hidden_size must be a multiple of num_heads")
        if self.text_vocab < 100 or self.max_positions < 16:
            raise ValueError("llm.backbone: text_vocab >= 100 and max_positions >= 16")


@dataclass
class LoraOptions:
    """PEFT ``LoraConfig``: shared by all clients and aggregated by the server."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("llm.lora: r >= 1, alpha > 0, 0 <= dropout < 1")
        if not self.target_modules:
            raise ValueError("llm.lora.target_modules must name at least one module")


@dataclass
class PromptOptions:
    """Soft prompts. ``scenario_tokens`` per scenario (shared, aggregated; the scenario of a
    request follows ``scenario_rule``: ``none`` = one domain prompt, ``weekend`` = weekday vs
    weekend of the request's last event); ``personal_tokens`` of a prompt that stays on the
    device (0, the default: none — measured on ML-100K it did not help, even with the options
    below; README). ``init``: PEFT's ``PromptTuningInit`` (``SAMPLE_VOCAB`` or ``RANDOM``).

    What the personal prompt gets to learn with, beyond the joint step it shares with the
    adapters: ``personal_steps`` more local epochs on it alone (adapters fixed) each time the
    client trains, with Adam at ``personal_learning_rate``; ``personal_init``: where a new
    user's prompt starts, ``shared`` (the initial rows every user starts from) or ``history``
    (row j = the mean input embedding of the level-j code tokens of the user's training
    history)."""

    scenario_tokens: int = 8
    scenario_rule: str = "none"
    personal_tokens: int = 0
    init: str = "SAMPLE_VOCAB"
    personal_steps: int = 0
    personal_learning_rate: float = 0.01
    personal_init: str = "shared"

    def __post_init__(self) -> None:
        if self.scenario_tokens < 0 or self.personal_tokens < 0:
            raise ValueError("llm.prompts: token counts must be >= 0")
        if self.personal_steps < 0 or self.personal_learning_rate <= 0:
            raise ValueError("llm.prompts: personal_steps >= 0 and personal_learning_rate > 0")
        if self.personal_init not in PERSONAL_INITS:
            raise ValueError(f"llm.prompts.personal_init must be one of {PERSONAL_INITS}")
        if self.scenario_rule not in SCENARIO_RULES:
            raise ValueError(f"llm.prompts.scenario_rule must be one of {SCENARIO_RULES}")
        if self.init not in PROMPT_INITS:
            raise ValueError(f"llm.prompts.init must be one of {PROMPT_INITS}")

    @property
    def num_scenarios(self) -> int:
        return 2 if self.scenario_rule == "weekend" else 1


@dataclass
class FoundationConfig:
    """Server-side pretraining of the whole backbone on public data: catalogue text and
    semantic-ID ⇄ title alignment, plus the training sequences of ``consented_share`` of the
    users (0: none), who agreed to share them."""

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 2e-3
    consented_share: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("llm.foundation: epochs >= 0, batch_size >= 1, learning_rate > 0")
        if not 0 <= self.consented_share <= 1:
            raise ValueError("llm.foundation.consented_share must lie in [0, 1]")


@dataclass
class LLMRecConfig:
    """An LLM recommender: a causal LM reads a user's history as semantic-ID tokens (optionally
    with titles) and generates the next item's code under a prefix trie.

    ``base_model``: a local path, hub id or GGUF file of any ``AutoModelForCausalLM`` (its
    tokenizer gets the code tokens), or ``smollm2-135m`` (the packaged SmolLM2, ``make
    pretrained``); empty = the ``backbone`` built here. ``semantic_ids``: an artefact folder
    written by ``fedrec semantic-ids`` (empty: codes are built from the catalogue with the
    ``semantic_id`` section). ``foundation_dir``: where the foundation stage writes (and later
    runs read) the pretrained backbone; empty = ``<run dir>/foundation``. ``title_style``: how
    ``with_titles`` prompts and the foundation's alignment write a title: ``catalogue`` as the
    data has it ("Ice Storm, The"), ``readable`` as a pretrained model has read it in text ("The
    Ice Storm (1997)": article moved to the front, year added). ``code_init``: where the new
    code tokens' embeddings of a pretrained ``base_model`` start before alignment: ``mean``
    (transformers' mean resizing: all alike) or ``titles`` (each at the mean embedding of the
    titles of the items whose code holds it).
    """

    base_model: str = ""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    semantic_ids: str = ""
    foundation_dir: str = ""
    foundation: FoundationConfig = field(default_factory=FoundationConfig)
    max_items: int = 20
    with_titles: bool = False
    title_tokens: int = 6
    title_style: str = "catalogue"
    code_init: str = "mean"
    lora: LoraOptions = field(default_factory=LoraOptions)
    prompts: PromptOptions = field(default_factory=PromptOptions)
    beam_width: int = 20
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.title_tokens < 1:
            raise ValueError("llm: max_items >= 1 and title_tokens >= 1")
        check_installed(self.base_model)
        if self.title_style not in TITLE_STYLES:
            raise ValueError(
                f"llm.title_style must be one of {TITLE_STYLES}, got {self.title_style!r}"
            )
        if self.code_init not in CODE_INITS:
            raise ValueError(f"llm.code_init must be one of {CODE_INITS}, got {self.code_init!r}")
        if self.code_init == "titles" and not self.base_model:
            raise ValueError(
                "llm.code_init: titles needs a pretrained llm.base_model (the backbone built "
                "from llm.backbone knows no titles yet); set code_init: mean"
            )
        if self.beam_width < 1 or self.eval_batch_size < 1:
            raise ValueError("llm: beam_width >= 1 and eval_batch_size >= 1")
