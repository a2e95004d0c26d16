"""download_movielens: offline failure, checksum check, unpacking and caching. No network."""

import hashlib
import io
import urllib.error
import zipfile

import pytest

from fedrec.data import download
from fedrec.data.download import Archive, download_movielens
from fedrec.errors import FedrecDataError

U_DATA = b"1\t10\t5\t881250949\n"


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, content in files.items():
            bundle.writestr(name, content)
    return buffer.getvalue()


def serve(monkeypatch, payload: bytes) -> list[str]:
    """Make ``urlopen`` answer every request with ``payload``; return the list of URLs asked."""
    calls: list[str] = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(download.urllib.request, "urlopen", fake_urlopen)
    return calls


def offline(monkeypatch, error: Exception) -> None:
    def fake_urlopen(url, timeout=None):
        raise error

    monkeypatch.setattr(download.urllib.request, "urlopen", fake_urlopen)


def cache_entries(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(url, timeout=None):
        raise AssertionError(f"a test tried to reach {url}")

    monkeypatch.setattr(download.urllib.request, "urlopen", refuse)


def test_offline_fails_at_once_and_points_at_data_dir(tmp_path, monkeypatch):
    offline(monkeypatch, urllib.error.URLError("Name or service not known"))
    cache = tmp_path / "cache"
    with pytest.raises(FedrecDataError, match="--data-dir") as info:
        download_movielens("ml-100k", cache)
    assert "offline" in str(info.value)
    assert "Name or service not known" in str(info.value)
    assert cache_entries(cache) == []  # no zip, no .part, no folder


def test_a_download_cut_halfway_leaves_no_partial_file(tmp_path, monkeypatch):
    partial = tmp_path / "ml-1m.zip.part"
    seen_partial = []

    class CutResponse(io.BytesIO):
        def read(self, size=-1):
            if self.tell():
                seen_partial.append(partial.exists())
                raise ConnectionResetError("connection reset")
            return super().read(4)

    monkeypatch.setattr(
        download.urllib.request, "urlopen", lambda url, timeout=None: CutResponse(b"PK" * 64)
    )
    with pytest.raises(FedrecDataError, match="--data-dir"):
        download_movielens("ml-1m", tmp_path)
    assert seen_partial == [True]  # the download had started writing
    assert cache_entries(tmp_path) == []


def test_checksum_mismatch_deletes_the_zip(tmp_path, monkeypatch):
    calls = serve(monkeypatch, make_zip({"ml-100k/u.data": U_DATA}))
    with pytest.raises(FedrecDataError, match="SHA-256") as info:
        download_movielens("ml-100k", tmp_path)
    assert calls == [download.ARCHIVES["ml-100k"].url]
    assert download.ARCHIVES["ml-100k"].sha256 in str(info.value)
    assert info.value.path == str(tmp_path / "ml-100k.zip")
    assert "deleted" in str(info.value)
    assert cache_entries(tmp_path) == []


def test_success_unpacks_and_a_second_call_uses_the_cache(tmp_path, monkeypatch):
    payload = make_zip({"ml-100k/u.data": U_DATA, "ml-100k/README": b"readme"})
    archive = Archive(
        "https://example.invalid/ml-100k.zip", hashlib.sha256(payload).hexdigest(), "ml-100k"
    )
    monkeypatch.setattr(download, "ARCHIVES", {"ml-100k": archive})
    calls = serve(monkeypatch, payload)
    cache = tmp_path / "nested" / "cache"  # created on demand

    folder = download_movielens("ml-100k", cache)
    assert folder == cache / "ml-100k"
    assert (folder / "u.data").read_bytes() == U_DATA
    assert (folder / "README").read_bytes() == b"readme"
    assert calls == [archive.url]
    assert cache_entries(cache) == ["ml-100k", "ml-100k.zip"]  # no staging or .part left

    assert download_movielens("ml-100k", cache) == folder
    assert calls == [archive.url]  # not downloaded again


def test_a_verified_zip_already_in_the_cache_is_unpacked_without_downloading(tmp_path, monkeypatch):
    payload = make_zip({"ml-1m/ratings.dat": b"1::1193::5::978300760\n"})
    archive = Archive(
        "https://example.invalid/ml-1m.zip", hashlib.sha256(payload).hexdigest(), "ml-1m"
    )
    monkeypatch.setattr(download, "ARCHIVES", {"ml-1m": archive})
    (tmp_path / "ml-1m.zip").write_bytes(payload)
    folder = download_movielens("ml-1m", tmp_path)  # the autouse fixture refuses any request
    assert (folder / "ratings.dat").read_bytes() == b"1::1193::5::978300760\n"


def test_unknown_archive_name(tmp_path):
    with pytest.raises(FedrecDataError, match="unknown MovieLens archive 'ml-25m'") as info:
        download_movielens("ml-25m", tmp_path / "cache")
    assert "ml-100k" in str(info.value) and "ml-1m" in str(info.value)
    assert not (tmp_path / "cache").exists()
