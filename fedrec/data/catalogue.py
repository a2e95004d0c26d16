"""The item catalogue a server publishes to its clients.

A federated client never sees the population's data set, yet it must turn its own raw item
ids into the model's item indices, and some clients need item content (semantic IDs, LLM
prompts) or server statistics (popularity, for the audit). The catalogue is that public,
versioned, checksummed file: everything a client may know about items, and nothing about users.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from fedrec.data.dataset import InteractionDataset
from fedrec.errors import FedrecDataError

CATALOGUE_FORMAT = "fedrec-catalogue/1"

# An item's text: these columns, in this order (fedrec.semantic_id.content reads them too, so
# a client's item text is the server's).
DEFAULT_TEXT_COLUMNS = ("title", "genres", "year")

_REFETCH = "fetch it again from the server"


@dataclass(frozen=True)
class ItemCatalogue:
    """Item ``i`` of the model is ``raw_item_ids[i]`` (models shift by one for padding).

    Frozen, and its tables are stored as tuples and a read-only mapping, so ``content_hash``
    and ``index`` (computed once) cannot go stale.
    """

    raw_item_ids: tuple[str, ...]
    item_features: Mapping[str, tuple[str, ...]] = field(hash=False)
    popularity: tuple[int, ...] | None = None
    codes: tuple[tuple[int, ...], ...] | None = None
    revision: int = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # the only way to normalise fields of a frozen dataclass
        set_(self, "raw_item_ids", tuple(str(r) for r in self.raw_item_ids))
        n = len(self.raw_item_ids)
        features = {str(k): tuple(str(v) for v in col) for k, col in self.item_features.items()}
        for name, col in features.items():
            if len(col) != n:
                raise ValueError(f"item_features[{name!r}] has {len(col)} rows, expected {n}")
        set_(self, "item_features", MappingProxyType(features))
        if self.popularity is not None:
            set_(self, "popularity", tuple(int(p) for p in self.popularity))
            if len(self.popularity) != n:
                raise ValueError(f"popularity has {len(self.popularity)} rows, expected {n}")
        if self.codes is not None:
            set_(self, "codes", tuple(tuple(int(c) for c in row) for row in self.codes))
            if len(self.codes) != n:
                raise ValueError(f"codes has {len(self.codes)} rows, expected {n}")
            if len({len(row) for row in self.codes}) > 1:
                raise ValueError("codes rows differ in length; every item needs the same levels")
        if isinstance(self.revision, bool) or not isinstance(self.revision, int):
            raise ValueError(f"revision must be an integer, got {self.revision!r}")
        if len(set(self.raw_item_ids)) != n:
            raise ValueError(f"raw_item_ids has {n - len(set(self.raw_item_ids))} duplicate(s)")

    @property
    def num_items(self) -> int:
        return len(self.raw_item_ids)

    @cached_property
    def content_hash(self) -> str:
        """What a client checks before trusting a download: sha256 of the canonical JSON."""
        return _content_hash(self._payload())

    @cached_property
    def index(self) -> Mapping[str, int]:
        return MappingProxyType({raw: i for i, raw in enumerate(self.raw_item_ids)})

    def map_items(self, raw_items: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, known)``; unknown items get -1 so callers decide to skip, not crash."""
        index = self.index
        indices = np.fromiter(
            (index.get(str(raw), -1) for raw in raw_items), dtype=np.int64, count=len(raw_items)
        )
        return indices, indices >= 0

    def item_texts(self, columns: Sequence[str] = DEFAULT_TEXT_COLUMNS) -> list[str]:
        """One line per item, built exactly as the server builds it for content encoders."""
        present = [self.item_features[c] for c in columns if c in self.item_features]
        if not present:
            raise ValueError(
                f"catalogue items have no text columns ({', '.join(columns)}); "
                "semantic IDs need item content"
            )
        return [" ".join(col[i] for col in present).strip() for i in range(self.num_items)]

    @classmethod
    def from_dataset(
        cls,
        dataset: InteractionDataset,
        popularity: np.ndarray | None = None,
        codes: np.ndarray | None = None,
        revision: int = 1,
    ) -> ItemCatalogue:
        """The catalogue of ``dataset``'s items, in its internal item order."""
        return cls(
            raw_item_ids=tuple(str(r) for r in dataset.raw_item_ids.tolist()),
            item_features={
                name: tuple(str(v) for v in col.tolist())
                for name, col in dataset.item_features.items()
            },
            popularity=None if popularity is None else tuple(np.asarray(popularity).tolist()),
            codes=None if codes is None else tuple(map(tuple, np.asarray(codes).tolist())),
            revision=revision,
        )

    def save(self, path: Path) -> None:
        """Atomic, so a client polling the file never reads half a catalogue."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        try:
            tmp.write_text(self.to_text(), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> ItemCatalogue:
        """Read and verify a published catalogue; any doubt is an error, never a guess."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FedrecDataError(f"item catalogue not found; {_REFETCH}", path) from None
        except (OSError, UnicodeDecodeError) as err:
            raise FedrecDataError(
                f"cannot read the item catalogue ({err}); {_REFETCH}", path
            ) from err
        return cls.from_text(text, path)

    def to_text(self) -> str:
        """The published JSON (what ``save`` writes and ``from_text`` verifies)."""
        document = {"format": CATALOGUE_FORMAT, "content_hash": self.content_hash}
        document.update(self._payload())
        return json.dumps(document, ensure_ascii=False) + "\n"

    @classmethod
    def from_text(cls, text: str, path: Path | str) -> ItemCatalogue:
        """Verify and parse a published catalogue's JSON; ``path`` names where it came from."""
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            raise FedrecDataError(
                f"item catalogue is not valid JSON ({err.msg}); {_REFETCH}", path, err.lineno
            ) from err
        if not isinstance(document, dict) or document.get("format") != CATALOGUE_FORMAT:
            found = document.get("format") if isinstance(document, dict) else None
            raise FedrecDataError(
                f"not an item catalogue of format {CATALOGUE_FORMAT!r} (found {found!r}); "
                "check the path, or upgrade fedrec if the server publishes a newer format",
                path,
            )
        keys = ("raw_item_ids", "item_features", "popularity", "codes", "revision")
        missing = [k for k in (*keys, "content_hash") if k not in document]
        if missing:
            raise FedrecDataError(f"item catalogue lacks {missing}; {_REFETCH}", path)
        payload = {k: document[k] for k in keys}
        if _content_hash(payload) != document["content_hash"]:
            raise FedrecDataError(
                f"content_hash does not match: the catalogue was modified or truncated: {_REFETCH}",
                path,
            )
        try:
            return cls(**payload)
        except (TypeError, ValueError, AttributeError) as err:
            raise FedrecDataError(f"malformed item catalogue ({err}); {_REFETCH}", path) from err

    def _payload(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "raw_item_ids": list(self.raw_item_ids),
            "item_features": {k: list(v) for k, v in self.item_features.items()},
            "popularity": None if self.popularity is None else list(self.popularity),
            "codes": None if self.codes is None else [list(row) for row in self.codes],
        }


def _content_hash(payload: Mapping[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def keep_catalogue(published: str, path: Path) -> ItemCatalogue:
    """Store a catalogue received as JSON text at ``path``, only once it verifies (format and
    content hash): a device never replaces a good copy with a damaged one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".received")
    try:
        tmp.write_text(published, encoding="utf-8")
        catalogue = ItemCatalogue.load(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return catalogue
