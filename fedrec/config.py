"""Experiment configuration: YAML parsed once, at the app boundary, into validated dataclasses.

Errors name the file, the line and the option to fix (``configs/x.yaml:12: train.epochs: ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedrec.audits import AuditConfig
from fedrec.data import DataConfig
from fedrec.data.membership import MembershipConfig
from fedrec.errors import FedrecConfigError
from fedrec.evaluation import EvalConfig, metric_names
from fedrec.federation.config import FederatedConfig
from fedrec.llm_rec.config import LLMRecConfig
from fedrec.models import SequentialModelConfig, model_config, model_names
from fedrec.semantic_id.pipeline import SemanticIdConfig
from fedrec.serving.federated import RankingConfig
from fedrec.serving.store import ServingConfig
from fedrec.training import TrainConfig


@dataclass
class ExperimentConfig:
    """A whole experiment. ``model`` holds ``name`` plus that model's options; ``federated`` and
    ``audit`` (the per-round bias and fairness audit) are read by ``fedrec simulate`` only;
    ``semantic_id`` by ``fedrec semantic-ids``; ``privacy_audit`` holds users out of training
    and plants canaries for ``fedrec privacy-audit``. With an ``llm`` section the federation trains
    the LLM recommender's adapters instead of ``model``; with a ``ranking`` section, the funnel's
    ranker over a frozen retrieval bundle."""

    data: DataConfig = field(default_factory=DataConfig)
    model_name: str = "hstu"
    model: SequentialModelConfig = field(default_factory=lambda: model_config("hstu"))
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    semantic_id: SemanticIdConfig = field(default_factory=SemanticIdConfig)
    privacy_audit: MembershipConfig = field(default_factory=MembershipConfig)
    llm: LLMRecConfig | None = None
    ranking: RankingConfig | None = None
    serving: ServingConfig | None = None
    seed: int = 0
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        known = [n for n in metric_names(self.evaluation.ks) if not n.startswith("Coverage")]
        missing = [n for n in self.audit.metrics if n not in known]
        if missing:
            raise ValueError(
                f"audit.metrics {missing} are not computed with evaluation.ks "
                f"{list(self.evaluation.ks)}; choose from {known}"
            )
        rerank = self.audit.rerank
        if rerank is not None and rerank.top_n < max(self.evaluation.ks):
            raise ValueError(
                f"audit.rerank.top_n {rerank.top_n} must be >= the largest evaluation.ks "
                f"{max(self.evaluation.ks)} (metrics are taken from the re-ranked list)"
            )

    @property
    def federated_model_kind(self) -> str:
        """What a federation of this config trains (``fedrec.federated_models``): the LLM
        recommender's adapters with an ``llm`` section, the funnel's ranker with a ``ranking``
        section, else the sequential ``model``."""
        if self.llm is not None:
            return "llm"
        return "ranking" if self.ranking is not None else "sequential"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = {"name": out.pop("model_name"), **out["model"]}
        return out


class _Locations:
    """Line numbers of every key in a YAML document, by dotted path."""

    def __init__(self, text: str):
        self.lines: dict[str, int] = {}
        node = yaml.compose(text)
        if node is not None:
            self._walk(node, "")

    def _walk(self, node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                self.lines[path] = key.start_mark.line + 1
                self._walk(value, path)

    def line(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path.rpartition(".")[0]
        return None


def _check_type(value: Any, hint: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):  # a section given something other than its options
        raise ValueError(f"expected a mapping of options for this section, got {value!r}")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):  # the first that fits
            try:
                return _check_type(value, option, path)
            except ValueError as err:
                errors.append(err)
        raise errors[0]
    if origin is tuple and isinstance(value, list | tuple):
        return tuple(value)
    expected = {int: (int,), float: (int, float), bool: (bool,), str: (str,), dict: (dict,)}.get(
        origin or hint
    )
    if expected is not None and (
        not isinstance(value, expected) or (hint is not bool and isinstance(value, bool))
    ):
        raise ValueError(f"expected {getattr(hint, '__name__', hint)}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value) if hint is float else value


def _optional_dataclass(hint: Any) -> Any:
    """``SomeConfig | None`` → ``SomeConfig`` (a mapping in YAML switches the section on)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if dataclasses.is_dataclass(option):
                return option
    return hint


def _build(cls: type, data: Any, path: str, where: _Locations, source: str) -> Any:
    def fail(message: str, at: str) -> FedrecConfigError:
        line = where.line(at)
        prefix = f"{source}:{line}" if line else source
        return FedrecConfigError(f"{prefix}: {at or 'top level'}: {message}")

    if not isinstance(data, dict):
        raise fail(f"expected a mapping of options, got {data!r}", path)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        at = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = (
                f" (did you mean {close[0]!r}?)" if close else f"; known options: {sorted(fields)}"
            )
            raise fail(f"unknown option{hint}", at)
        hint_type = _optional_dataclass(hints[key]) if isinstance(value, dict) else hints[key]
        if dataclasses.is_dataclass(hint_type):
            kwargs[key] = _build(hint_type, value, at, where, source)  # type: ignore[arg-type]
            continue
        try:
            kwargs[key] = _check_type(value, hint_type, at)
        except ValueError as err:
            raise fail(str(err), at) from None
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise fail(str(err), path) from None


def parse_config(
    data: dict[str, Any], source: str = "<config>", text: str | None = None
) -> ExperimentConfig:
    where = _Locations(text) if text is not None else _Locations("{}")
    data = dict(data)
    raw_model = data.pop("model", {}) or {}
    if not isinstance(raw_model, dict):
        raise FedrecConfigError(
            f"{source}: model: expected a mapping with 'name' and model options"
        )
    raw_model = dict(raw_model)
    name = raw_model.pop("name", "hstu")
    if name not in model_names():
        line = where.line("model.name")
        raise FedrecConfigError(
            f"{source}:{line}: model.name: unknown model {name!r}; registered: {model_names()}"
        )
    config_cls = type(model_config(name))
    model = _build(config_cls, raw_model, "model", where, source)
    if "model_name" in data:
        raise FedrecConfigError(f"{source}: set the model with model.name, not model_name")
    experiment = _build(ExperimentConfig, data, "", where, source)
    experiment.model_name = name
    experiment.model = model
    fed = experiment.federated
    if experiment.ranking is not None:
        line = where.line("ranking")
        at = f"{source}{f':{line}' if line else ''}: ranking"
        if experiment.llm is not None:
            raise FedrecConfigError(
                f"{at}: a federation trains one model: remove the llm or the ranking section"
            )
        if fed.record_dp is not None:
            raise FedrecConfigError(
                f"{at}: federated.record_dp is not available for the ranker: an example's "
                "features read the whole history before it (user vector, candidates), so one "
                "record moves every later example and no per-record bound holds; remove "
                "record_dp and use user-level DP (federated.central_dp)"
            )
    sequential = experiment.llm is None and experiment.ranking is None
    if sequential and fed.record_dp is not None and model.loss == "full_softmax":
        line = where.line("model.loss") or where.line("federated.record_dp")
        raise FedrecConfigError(
            f"{source}:{line}: federated.record_dp needs model.loss: sampled_softmax; the full "
            "softmax scores every item through the item table directly, where DP-SGD's "
            "per-example gradients cannot see it"
        )
    prompts = experiment.llm.prompts if experiment.llm is not None else None
    if (
        prompts is not None
        and prompts.personal_tokens
        and fed.record_dp is not None
        and (prompts.personal_steps or prompts.personal_init != "shared")
    ):
        at = "llm.prompts.personal_steps" if prompts.personal_steps else "llm.prompts.personal_init"
        line = where.line(at) or where.line("federated.record_dp")
        raise FedrecConfigError(
            f"{source}{f':{line}' if line else ''}: {at} trains or "
            "starts the personal prompt from the user's data outside DP-SGD, and every later "
            "shared update reads that prompt, so federated.record_dp would no longer bound what "
            "the server learns; under record_dp keep personal_steps: 0 and personal_init: shared "
            "(the prompt is then trained inside DP-SGD with the adapters)"
        )
    if (
        sequential
        and fed.record_dp is not None
        and fed.partitioning == "user"
        and fed.record_window > model.max_len
    ):
        line = where.line("federated.record_window") or where.line("model.max_len")
        raise FedrecConfigError(
            f"{source}:{line}: federated.record_window {fed.record_window} is longer than "
            f"model.max_len {model.max_len}: every DP-SGD record (a user-day of up to "
            "record_window events) would fail in the model; set record_window <= max_len"
        )
    serving = experiment.serving
    if serving is not None:
        line = where.line("serving.funnel.sources") or where.line("serving")
        at = f"{source}{f':{line}' if line else ''}: serving"
        if experiment.llm is not None and not serving.retrieval:
            raise FedrecConfigError(
                f"{at}.retrieval: an LLM federation's bundles serve its adapters beside a "
                "frozen retrieval bundle: name one (a sequential federation's RUN/serving/v…, "
                "or simulations/bench_funnel.py --bundle-out)"
            )
        if experiment.llm is None and serving.retrieval:
            raise FedrecConfigError(
                f"{at}.retrieval: only an LLM federation serves a frozen retrieval bundle "
                "(a ranker federation names it in ranking.retrieval; remove this)"
            )
        if serving.funnel.rank and experiment.ranking is None:
            line = where.line("serving.funnel.rank") or line
            raise FedrecConfigError(
                f"{source}{f':{line}' if line else ''}: serving.funnel.rank: this federation "
                "trains no ranker; set rank: false, or federate the ranker (a ranking section)"
            )
        served = {name, "popularity"}
        if sequential and not set(serving.funnel.sources) <= served:
            raise FedrecConfigError(
                f"{at}.funnel.sources {list(serving.funnel.sources)}: a federation's bundle "
                f"serves {sorted(served)} (model.name and popularity)"
            )
    return experiment


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise FedrecConfigError(f"{path}: config file not found (see configs/ for examples)")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise FedrecConfigError(
            f"{path}{line}: invalid YAML: {getattr(err, 'problem', err)}"
        ) from None
    if not isinstance(data, dict):
        raise FedrecConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(data, str(path), text)
