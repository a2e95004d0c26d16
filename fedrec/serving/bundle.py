"""The model bundle the server publishes after each round: what a device needs to recommend.

A bundle is the round's global tensors, the experiment config they were trained under (public:
it says how to build the model) and the item catalogue with its semantic IDs, versioned by
round and hashed. The LLM recommender's frozen foundation (the public backbone the server
pretrained) is too large to send every round: a bundle names it by ``foundation_hash``
(``foundation_digest`` of its folder), and a device uses only a foundation with that digest. The hash covers a canonical digest of every tensor (name, dtype, shape,
bytes), so a device that got the tensors in a round's message, and the catalogue in its first
one, recomputes the same hash and checks it against the one the server announced: what it
runs is what the server published, bit for bit.

On disk (``RUN/bundle/``) a bundle is one file, ``latest.bundle`` (an 8-byte length, the JSON
manifest, then the tensors as safetensors), rewritten atomically each round, and
``latest.json`` (its manifest, for anyone polling the version and hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedrec.data.catalogue import ItemCatalogue
from fedrec.errors import FedrecDataError

BUNDLE_FORMAT = "fedrec-bundle/1"
BUNDLE_DIR, BUNDLE_FILE, MANIFEST_FILE = "bundle", "latest.bundle", "latest.json"


def tensors_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor by name: its dtype, shape and bytes (independent of how the
    tensors were serialised on the way)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        header = f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode()
        digest.update(struct.pack("<Q", len(header)) + header)
        digest.update(tensor.numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelBundle:
    version: int  # the round whose aggregate these tensors are (0: the initial model)
    config: str  # the experiment YAML
    catalogue: str  # the published catalogue JSON (raw ids, titles, codes)
    catalogue_hash: str
    state: dict[str, torch.Tensor]
    foundation_hash: str = ""  # the LLM recommender's foundation folder, by digest

    @property
    def content_hash(self) -> str:
        return bundle_hash(
            self.version, self.config, self.catalogue_hash, self.state, self.foundation_hash
        )

    def manifest(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "version": self.version,
            "catalogue_hash": self.catalogue_hash,
            "foundation_hash": self.foundation_hash,
            "content_hash": self.content_hash,
            "config": self.config,
            "catalogue": self.catalogue,
        }

    def to_bytes(self) -> bytes:
        manifest = json.dumps(self.manifest(), ensure_ascii=False).encode("utf-8")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state.items()}
        return struct.pack("<Q", len(manifest)) + manifest + save_tensors(state)

    @classmethod
    def from_bytes(cls, data: bytes, where: str | Path) -> ModelBundle:
        """Parse and verify a bundle: any doubt (format, truncation, hash) is an error."""
        try:
            (length,) = struct.unpack("<Q", data[:8])
            manifest = json.loads(data[8 : 8 + length].decode("utf-8"))
            state = load_tensors(data[8 + length :])
            bundle = cls(
                int(manifest["version"]),
                str(manifest["config"]),
                str(manifest["catalogue"]),
                str(manifest["catalogue_hash"]),
                dict(state),
                str(manifest.get("foundation_hash", "")),
            )
        except (
            struct.error,
            ValueError,
            KeyError,
            TypeError,
            UnicodeDecodeError,
            SafetensorError,
        ) as err:
            raise FedrecDataError(f"not a readable model bundle ({err})", where) from None
        if manifest.get("format") != BUNDLE_FORMAT:
            raise FedrecDataError(
                f"a bundle of format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}", where
            )
        if bundle.content_hash != manifest.get("content_hash"):
            raise FedrecDataError("the bundle's content does not match its hash", where)
        if _catalogue_hash(bundle.catalogue) != bundle.catalogue_hash:
            raise FedrecDataError("the bundle's catalogue does not match its hash", where)
        return bundle

    def publish(self, run_dir: Path) -> Path:
        """Write ``RUN/bundle/latest.bundle`` and its manifest atomically; returns the file."""
        folder = run_dir / BUNDLE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {k: v for k, v in self.manifest().items() if k not in ("config", "catalogue")}
        for name, data in (
            (BUNDLE_FILE, self.to_bytes()),
            (MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode("utf-8")),
        ):
            tmp = folder / f"{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)
        return folder / BUNDLE_FILE


def bundle_hash(
    version: int,
    config: str,
    catalogue_hash: str,
    state: Mapping[str, torch.Tensor],
    foundation_hash: str = "",
) -> str:
    """What a bundle's ``content_hash`` is, from its parts (a device recomputes it)."""
    canonical = json.dumps(
        {
            "format": BUNDLE_FORMAT,
            "version": version,
            "config_sha256": hashlib.sha256(config.encode("utf-8")).hexdigest(),
            "catalogue_hash": catalogue_hash,
            "foundation_hash": foundation_hash,
            "tensors": tensors_digest(state),
        },
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _catalogue_hash(text: str) -> str:
    """The content hash a published catalogue states of itself (checked on load)."""
    try:
        return str(ItemCatalogue.from_text(text, "bundle").content_hash)
    except FedrecDataError:
        return ""


def foundation_digest(folder: Path) -> str:
    """SHA-256 over every file of a foundation folder (relative path and bytes, in order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise FedrecDataError("no foundation here (an empty folder)", folder)
    for path in files:
        name = path.relative_to(folder).as_posix().encode()
        digest.update(struct.pack("<Q", len(name)) + name)
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
