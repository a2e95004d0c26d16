"""A device's encrypted store: SQLite, with every value under AES-GCM (``cryptography``).

The device SDK keeps the user's events, personal parameters, privacy ledger and the latest
global model bundle here. Nothing is readable at rest: each value is sealed with a fresh 96-bit
nonce, and its place (``kind`` and row id, or its name) is the associated data, so a value moved
to another row fails to open as well as a flipped byte does. A wrong key, or an altered file,
is an error that names the folder and changes nothing: the store is never reset. Writes are
SQLite transactions (WAL, ``synchronous=FULL``), so a crash loses only what was not yet
committed. One process at a time: a second open waits up to ``wait`` seconds for the holder to
close, then fails naming it.

Values are sealed with a random data key, itself sealed with the caller's key. ``shred``
(``forget``) deletes values, seals everything kept under a new data key and rewrites the file
(``secure_delete``, ``VACUUM``, the WAL truncated): the file no longer holds what was
forgotten, nor the key that opened it. A kill before the rewrite leaves a flag that the next
open acts on. A copy of the file made before (a backup) still opens with the caller's key:
pass ``new_key`` and keep only that one, and no earlier copy opens with the key kept.

Written here because no well-kept library encrypts SQLite rows with a caller's key without a
native build (SQLCipher); ``cryptography``'s AESGCM does the sealing.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, TextIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fedrec.errors import FedrecDataError

DATABASE, LOCK, SALT = "store.db", "store.lock", "salt"
CHECK = b"fedrec encrypted store v1"  # sealed at creation: opening it proves the key
CHECK_NAME, DATA_KEY, SHRED_PENDING = "\0check", "\0data-key", "\0shred-pending"


def key_from_passphrase(passphrase: str, folder: Path) -> bytes:
    """A 256-bit key from a passphrase (scrypt, n 2¹⁵, r 8, p 1) and the store's own random
    salt, made with the folder; an OS keystore can hand ``EncryptedStore`` a key directly."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    salt_file = folder / SALT
    if not salt_file.exists():
        _private_file(salt_file, os.urandom(16))
    return Scrypt(salt=salt_file.read_bytes(), length=32, n=2**15, r=8, p=1).derive(
        passphrase.encode("utf-8")
    )


class EncryptedStore:
    """Named values (``put``/``get``) and append-only rows by kind (``add``/``rows``), all
    sealed with ``key`` (32 bytes)."""

    def __init__(self, folder: Path, key: bytes, wait: float = 0.0):
        if len(key) != 32:
            raise ValueError("the store key must be 32 bytes (key_from_passphrase makes one)")
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock: TextIO | None = _exclusive(folder / LOCK, wait)
        self._master = AESGCM(key)
        self._aead = self._master
        path = folder / DATABASE
        new = not path.exists()
        if new:
            _private_file(path, b"")
        self._db = sqlite3.connect(path, isolation_level=None)
        try:
            self._prepare(new)
        except Exception:
            self.close()  # a store that did not open holds no lock
            raise

    def _prepare(self, new: bool) -> None:
        """Tables, and the key check: sealed when the store is made, opened every time after."""
        path = self.folder / DATABASE
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS named (name TEXT PRIMARY KEY, sealed BLOB NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS rows (kind TEXT NOT NULL, id INTEGER NOT NULL, "
                "sealed BLOB NOT NULL, PRIMARY KEY (kind, id))"
            )
        except sqlite3.DatabaseError as err:
            raise FedrecDataError(
                f"not a readable store ({err}); it is left as it is", path
            ) from None
        check = self._one("SELECT sealed FROM named WHERE name = ?", (CHECK_NAME,))
        if check is not None:
            self._open(check[0], CHECK_NAME)  # raises on a wrong key
            sealed_key = self._one("SELECT sealed FROM named WHERE name = ?", (DATA_KEY,))
            if sealed_key is None:
                raise FedrecDataError("the data key is missing: the store was altered", path)
            self._aead = AESGCM(self._open(sealed_key[0], DATA_KEY))
            if self._one("SELECT 1 FROM named WHERE name = ?", (SHRED_PENDING,)) is not None:
                self._rewrite()  # a shred killed before its rewrite: finish it
            return
        stored = self._one("SELECT (SELECT count(*) FROM rows) + (SELECT count(*) FROM named)", ())
        if not new and stored is not None and stored[0] > 0:
            raise FedrecDataError("the key check is missing: the store was altered", path)
        data_key = AESGCM.generate_key(256)
        with self._transaction():
            self._db.execute(
                "INSERT INTO named VALUES (?, ?)", (CHECK_NAME, self._seal(CHECK, CHECK_NAME))
            )
            self._db.execute(
                "INSERT INTO named VALUES (?, ?)", (DATA_KEY, self._seal(data_key, DATA_KEY))
            )
        self._aead = AESGCM(data_key)

    def put(self, name: str, value: bytes) -> None:
        """Set the named value (a ledger, personal parameters, a model bundle)."""
        if not name or name.startswith("\0") or ":" in name:
            raise ValueError(f"{name!r}: a name is not empty, has no ':' and no leading NUL")
        self._write(
            "INSERT INTO named VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET sealed = excluded.sealed",
            (name, self._seal(value, name)),
        )

    def get(self, name: str) -> bytes | None:
        row = self._one("SELECT sealed FROM named WHERE name = ?", (name,))
        return None if row is None else self._open(row[0], name)

    def add(self, kind: str, values: list[bytes]) -> None:
        """Append ``values`` as rows of ``kind``, all or none (one transaction)."""
        with self._transaction():
            last = self._one("SELECT max(id) FROM rows WHERE kind = ?", (kind,))
            start = 0 if last is None or last[0] is None else int(last[0]) + 1
            sealed = [
                (kind, start + i, self._seal(v, f"{kind}:{start + i}"))
                for i, v in enumerate(values)
            ]
            self._db.executemany("INSERT INTO rows VALUES (?, ?, ?)", sealed)

    def rows(self, kind: str) -> list[bytes]:
        found = self._db.execute("SELECT id, sealed FROM rows WHERE kind = ? ORDER BY id", (kind,))
        return [self._open(sealed, f"{kind}:{i}") for i, sealed in found]

    def delete(self, kind: str | None = None, name: str | None = None) -> None:
        """Remove every row of ``kind`` and/or the value ``name`` (``forget``)."""
        with self._transaction():
            if kind is not None:
                self._db.execute("DELETE FROM rows WHERE kind = ?", (kind,))
            if name is not None:
                self._db.execute("DELETE FROM named WHERE name = ?", (name,))

    def names(self) -> list[str]:
        """The named values held (not the store's own key records)."""
        found = self._db.execute("SELECT name FROM named WHERE unicode(name) != 0 ORDER BY name")
        return [name for (name,) in found]

    def shred(
        self, kinds: tuple[str, ...] = (), names: tuple[str, ...] = (), new_key: bytes | None = None
    ) -> None:
        """Delete the rows of ``kinds`` and the values ``names``, then seal what is kept under a
        new data key (sealed with ``new_key`` when given, else the caller's key) and rewrite
        the file, so nothing deleted can be recovered from it."""
        if new_key is not None and len(new_key) != 32:
            raise ValueError("the new store key must be 32 bytes")
        kept_names = [(n, self.get(n)) for n in self.names() if n not in names]
        kept_rows = [
            (kind, i, self._open(sealed, f"{kind}:{i}"))
            for kind, i, sealed in self._db.execute("SELECT kind, id, sealed FROM rows").fetchall()
            if kind not in kinds
        ]
        data_key = AESGCM.generate_key(256)
        new = AESGCM(data_key)
        master = self._master if new_key is None else AESGCM(new_key)
        with self._transaction():
            self._db.execute("DELETE FROM rows")
            self._db.execute("DELETE FROM named")
            self._db.executemany(
                "INSERT INTO named VALUES (?, ?)",
                [
                    (CHECK_NAME, _sealed(master, CHECK, CHECK_NAME)),
                    (DATA_KEY, _sealed(master, data_key, DATA_KEY)),
                    (SHRED_PENDING, _sealed(master, b"1", SHRED_PENDING)),
                ],
            )
            self._db.executemany(
                "INSERT INTO named VALUES (?, ?)",
                [(n, _sealed(new, v or b"", n)) for n, v in kept_names],
            )
            self._db.executemany(
                "INSERT INTO rows VALUES (?, ?, ?)",
                [(k, i, _sealed(new, v, f"{k}:{i}")) for k, i, v in kept_rows],
            )
        self._master, self._aead = master, new
        self._rewrite()

    def _rewrite(self) -> None:
        """Rewrite the file without free pages and empty the WAL, then clear the pending flag
        (set by ``shred`` in its own transaction)."""
        self._db.execute("VACUUM")
        for _ in range(2):  # the flag's deletion goes through the WAL too
            busy = self._one("PRAGMA wal_checkpoint(TRUNCATE)", ())
            if busy is not None and busy[0]:
                raise FedrecDataError(
                    "the store's log could not be emptied (busy): forgotten data may remain "
                    "until the next open",
                    self.folder / DATABASE,
                )
            if self._one("SELECT 1 FROM named WHERE name = ?", (SHRED_PENDING,)) is None:
                break
            self._write("DELETE FROM named WHERE name = ?", (SHRED_PENDING,))

    def close(self) -> None:
        if self._lock is not None:
            self._db.close()
            self._lock.close()  # releases the lock
            self._lock = None

    def __enter__(self) -> EncryptedStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _seal(self, value: bytes, place: str) -> bytes:
        return _sealed(self._master if place.startswith("\0") else self._aead, value, place)

    def _open(self, sealed: bytes, place: str) -> bytes:
        aead = self._master if place.startswith("\0") else self._aead
        try:
            return aead.decrypt(sealed[:12], sealed[12:], place.encode("utf-8"))
        except InvalidTag:
            raise FedrecDataError(
                f"{place!r} does not open with this key: a wrong key, or the store was altered "
                "or damaged; nothing was changed",
                self.folder / DATABASE,
            ) from None

    def _one(self, query: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        result: tuple[Any, ...] | None = self._db.execute(query, args).fetchone()
        return result

    def _write(self, query: str, args: tuple[object, ...]) -> None:
        with self._transaction():
            self._db.execute(query, args)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if kind is not None else "COMMIT")


def _sealed(aead: AESGCM, value: bytes, place: str) -> bytes:
    nonce = os.urandom(12)
    return nonce + aead.encrypt(nonce, value, place.encode("utf-8"))


def _exclusive(path: Path, wait: float) -> TextIO:
    """The store's lock file, held for as long as the store is open (waiting up to ``wait``
    seconds for another holder to let go)."""
    handle = open(path, "a+")  # noqa: SIM115 - held open: closing it releases the lock
    os.chmod(path, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FedrecDataError(
                f"the store is open in {holder}: close it there first", path.parent
            ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}")
    handle.flush()
    return handle


def _private_file(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
