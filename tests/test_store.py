"""The device's encrypted store: nothing readable at rest, a wrong key or an altered byte is an
error that changes nothing, a crash loses nothing committed, one process at a time."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from fedrec.device.store import DATABASE, EncryptedStore, key_from_passphrase
from fedrec.errors import FedrecDataError

KEY = bytes(range(32))
EVENT = b'{"item": "tt0076759", "title": "Star Wars (1977)", "timestamp": 881250949}'


def _raw(folder) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())


def test_values_and_rows_round_trip_across_opens(tmp_path):
    with EncryptedStore(tmp_path, KEY) as store:
        store.put("ledger", b"{}")
        store.add("events", [b"a", b"b"])
        store.add("events", [b"c"])
        store.put("ledger", b'{"events": []}')
    with EncryptedStore(tmp_path, KEY) as store:
        assert store.get("ledger") == b'{"events": []}' and store.get("missing") is None
        assert store.rows("events") == [b"a", b"b", b"c"]
        store.delete(kind="events", name="ledger")
        assert store.rows("events") == [] and store.get("ledger") is None


def test_nothing_is_readable_at_rest(tmp_path):
    with EncryptedStore(tmp_path, KEY) as store:
        store.add("events", [EVENT] * 50)
        store.put("personal", EVENT)
    raw = _raw(tmp_path)
    assert len(raw) > 50 * len(EVENT)  # the data is there, sealed
    for secret in (b"tt0076759", b"Star Wars", b"881250949"):
        assert secret not in raw
    assert oct((tmp_path / DATABASE).stat().st_mode & 0o777) == oct(0o600)


def test_a_wrong_key_is_an_error_that_changes_nothing(tmp_path):
    with EncryptedStore(tmp_path, KEY) as store:
        store.add("events", [EVENT])
    before = (tmp_path / DATABASE).read_bytes()
    with pytest.raises(FedrecDataError, match="does not open with this key") as err:
        EncryptedStore(tmp_path, bytes(32))
    assert str(tmp_path) in str(err.value)
    assert (tmp_path / DATABASE).read_bytes() == before
    with EncryptedStore(tmp_path, KEY) as store:  # the right key still opens it
        assert store.rows("events") == [EVENT]


def test_a_flipped_byte_and_a_moved_row_are_detected(tmp_path):
    with EncryptedStore(tmp_path, KEY) as store:
        store.add("events", [EVENT, EVENT + b"!"])
    db = sqlite3.connect(tmp_path / DATABASE)
    first, second = (row[0] for row in db.execute("SELECT sealed FROM rows ORDER BY id"))
    db.execute("UPDATE rows SET sealed = ? WHERE id = 0", (second,))  # row 1's value in row 0
    db.commit()
    with EncryptedStore(tmp_path, KEY) as store, pytest.raises(FedrecDataError, match="'events:0'"):
        store.rows("events")
    flipped = bytearray(first)
    flipped[20] ^= 1
    db.execute("UPDATE rows SET sealed = ? WHERE id = 0", (bytes(flipped),))
    db.commit()
    db.close()
    with EncryptedStore(tmp_path, KEY) as store, pytest.raises(FedrecDataError, match="altered"):
        store.rows("events")


def test_a_second_process_cannot_open_an_open_store(tmp_path):
    with EncryptedStore(tmp_path, KEY):
        opened = subprocess.run(
            [sys.executable, "-c", _OPEN.format(folder=str(tmp_path))],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert opened.returncode == 1 and "open in process" in opened.stderr
    assert (
        subprocess.run([sys.executable, "-c", _OPEN.format(folder=str(tmp_path))]).returncode == 0
    )


_OPEN = """
import sys
from pathlib import Path
from fedrec.device.store import EncryptedStore
from fedrec.errors import FedrecDataError
try:
    EncryptedStore(Path({folder!r}), bytes(range(32))).close()
except FedrecDataError as err:
    print(err, file=sys.stderr)
    sys.exit(1)
"""

_WRITER = """
import sys
from pathlib import Path
from fedrec.device.store import EncryptedStore
store = EncryptedStore(Path({folder!r}), bytes(range(32)))
for n in range(100000):
    store.add("events", [b"event %d" % n])
    print(n + 1, flush=True)
"""


def test_a_kill_mid_write_loses_nothing_committed(tmp_path):
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER.format(folder=str(tmp_path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    committed = 0
    deadline = time.monotonic() + 60
    while committed < 200 and time.monotonic() < deadline:
        committed = int(writer.stdout.readline())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    with EncryptedStore(tmp_path, KEY) as store:  # the lock died with the writer
        rows = store.rows("events")
    assert len(rows) >= committed >= 200
    assert rows == [b"event %d" % n for n in range(len(rows))]


def test_a_passphrase_gives_the_same_key_for_its_store_only(tmp_path):
    one = key_from_passphrase("correct horse", tmp_path / "a")
    assert key_from_passphrase("correct horse", tmp_path / "a") == one
    assert key_from_passphrase("correct horse", tmp_path / "b") != one  # its own salt
    assert key_from_passphrase("wrong horse", tmp_path / "a") != one
    assert oct((tmp_path / "a" / "salt").stat().st_mode & 0o777) == oct(0o600)


def test_shred_forgets_for_good_and_keeps_the_rest(tmp_path):
    folder = tmp_path / "store"
    with EncryptedStore(folder, KEY) as store:
        store.add("events", [EVENT] * 3)
        store.add("other", [b"kept row"])
        store.put("ledger", b"kept value")
        store.put("personal", b"forgotten value")
    old = (folder / DATABASE).read_bytes()
    with EncryptedStore(folder, KEY) as store:
        store.shred(kinds=("events",), names=("personal",))
        assert store.rows("events") == [] and store.get("personal") is None
        assert store.rows("other") == [b"kept row"] and store.get("ledger") == b"kept value"
        store.add("events", [b"fresh"])
        assert store.rows("events") == [b"fresh"]
    with EncryptedStore(folder, KEY) as store:  # reopens under the new data key
        assert store.rows("events") == [b"fresh"] and store.get("ledger") == b"kept value"
    # a copy of the file from before, opened with the caller's key, still opens its old data
    # key; the file after holds only the new one, under which the old rows do not open
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / DATABASE).write_bytes(old)
    with EncryptedStore(copy, KEY) as before:
        assert before.rows("events") == [EVENT] * 3
    new = sqlite3.connect(folder / DATABASE)
    assert new.execute("SELECT count(*) FROM rows WHERE kind = 'events'").fetchone() == (1,)
    new.close()
    old_rows = sqlite3.connect(copy / DATABASE).execute(
        "SELECT sealed FROM rows WHERE kind = 'events'"
    )
    with EncryptedStore(folder, KEY) as store:
        for (sealed,) in old_rows:
            with pytest.raises(FedrecDataError):
                store._open(sealed, "events:0")
    assert EVENT not in (folder / DATABASE).read_bytes()


def test_shred_with_a_new_key_and_a_kill_before_the_rewrite(tmp_path):
    folder = tmp_path / "store"
    with EncryptedStore(folder, KEY) as store:
        store.add("events", [EVENT] * 3)
        store.put("ledger", b"kept value")
    new_key = bytes(range(1, 33))
    killed = subprocess.run(
        [sys.executable, "-c", _SHRED_THEN_DIE.format(folder=str(folder))], timeout=60
    )
    assert killed.returncode == 9  # died between the commit and the rewrite
    with pytest.raises(FedrecDataError, match="does not open with this key"):
        EncryptedStore(folder, KEY)  # the old key opens nothing any more
    with EncryptedStore(folder, new_key) as store:  # the open finishes the rewrite
        assert store.rows("events") == [] and store.get("ledger") == b"kept value"
    assert not (folder / "store.db-wal").exists() or (folder / "store.db-wal").stat().st_size == 0
    db = sqlite3.connect(folder / DATABASE)
    assert db.execute(
        "SELECT count(*) FROM named WHERE name = ?", ("\0shred-pending",)
    ).fetchone() == (0,)
    db.close()
    with pytest.raises(ValueError, match="no ':'"), EncryptedStore(folder, new_key) as store:
        store.put("events:0", b"x")


_SHRED_THEN_DIE = """
import os
from pathlib import Path
from fedrec.device.store import EncryptedStore
store = EncryptedStore(Path({folder!r}), bytes(range(32)))
store._rewrite = lambda: os._exit(9)
store.shred(kinds=("events",), new_key=bytes(range(1, 33)))
"""
