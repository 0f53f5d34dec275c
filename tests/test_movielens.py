"""Tests for beam_pipelines.sources.download: local copies, verified downloads, safe extraction (offline)."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import zipfile

import pytest

from beam_pipelines.sources import download as movielens
from beam_pipelines.sources import records

ML100K_FILES = {"u.data": b"1\t2\t5\t881250949\n", "u.item": b"", "u.user": b"", "u.genre": b"unknown|0\n"}


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class FakeOpener:
    """Serves fixed bytes per URL, records what was asked, raises for unknown URLs."""

    def __init__(self, responses: dict):
        self.responses = responses
        self.calls = []

    def __call__(self, url: str):
        self.calls.append(url)
        if url not in self.responses:
            raise OSError(f"no route to {url}")  # what urlopen raises when offline (URLError is an OSError)
        return io.BytesIO(self.responses[url])


def _archive(name: str = "ml-100k") -> bytes:
    return _zip({f"{name}/{f}": data for f, data in ML100K_FILES.items()})


def test_required_files():
    assert movielens.required_files("ml-100k") == ("u.data", "u.item", "u.user", "u.genre")
    assert movielens.required_files("ml-25m") == ("ratings.csv", "movies.csv")
    with pytest.raises(ValueError, match="unknown MovieLens"):
        movielens.required_files("ml-1b")


def test_local_dir_is_used_without_network(tmp_path):
    local = tmp_path / "mine"
    local.mkdir()
    for f, data in ML100K_FILES.items():
        (local / f).write_bytes(data)
    opener = FakeOpener({})
    assert movielens.fetch_movielens("ml-100k", str(tmp_path / "dest"), local_dir=str(local), url_opener=opener) == str(local)
    assert opener.calls == []


def test_incomplete_local_dir_is_an_error(tmp_path):
    (tmp_path / "u.data").write_bytes(b"")
    with pytest.raises(records.InputError, match=r"missing \['u.item', 'u.user', 'u.genre'\]"):
        movielens.fetch_movielens("ml-100k", str(tmp_path / "dest"), local_dir=str(tmp_path))


def test_already_extracted_dest_is_reused(tmp_path):
    target = tmp_path / "ml-100k"
    target.mkdir()
    for f, data in ML100K_FILES.items():
        (target / f).write_bytes(data)
    opener = FakeOpener({})
    assert movielens.fetch_movielens("ml-100k", str(tmp_path), url_opener=opener) == str(target)
    assert opener.calls == []


def test_download_with_good_checksum_extracts(tmp_path):
    data = _archive()
    url = movielens.archive_url("ml-100k")
    opener = FakeOpener({url: data})
    out = movielens.fetch_movielens("ml-100k", str(tmp_path), url_opener=opener,
                                    expected_md5=hashlib.md5(data).hexdigest())
    assert out == str(tmp_path / "ml-100k")
    assert (tmp_path / "ml-100k" / "u.data").read_bytes() == ML100K_FILES["u.data"]
    assert sorted(os.listdir(tmp_path)) == ["ml-100k"]  # no archive, .part or scratch dir left


def test_wrong_checksum_is_refused_and_nothing_extracted(tmp_path):
    # The pinned ml-100k MD5 cannot match our tiny archive.
    opener = FakeOpener({movielens.archive_url("ml-100k"): _archive()})
    with pytest.raises(movielens.DownloadError, match="does not match.*nothing was extracted"):
        movielens.fetch_movielens("ml-100k", str(tmp_path), url_opener=opener)
    assert os.listdir(tmp_path) == []


def test_published_md5_is_used_for_unpinned_archives(tmp_path):
    data = _zip({"ml-latest-small/ratings.csv": b"userId,movieId,rating,timestamp\n",
                 "ml-latest-small/movies.csv": b"movieId,title,genres\n"})
    url = movielens.archive_url("ml-latest-small")
    good = FakeOpener({url: data, url + ".md5": f"MD5 (ml-latest-small.zip) = {hashlib.md5(data).hexdigest()}\n".encode()})
    out = movielens.fetch_movielens("ml-latest-small", str(tmp_path / "a"), url_opener=good)
    assert os.path.isfile(os.path.join(out, "movies.csv"))
    assert good.calls == [url, url + ".md5"]

    bad = FakeOpener({url: data, url + ".md5": b"0" * 32 + b"  ml-latest-small.zip\n"})
    with pytest.raises(movielens.DownloadError, match="does not match"):
        movielens.fetch_movielens("ml-latest-small", str(tmp_path / "b"), url_opener=bad)
    assert os.listdir(tmp_path / "b") == []

    # No checksum available: refuse rather than extract unverified bytes.
    with pytest.raises(movielens.DownloadError, match="not extracted.*expected_md5"):
        movielens.fetch_movielens("ml-latest-small", str(tmp_path / "c"), url_opener=FakeOpener({url: data}))
    assert os.listdir(tmp_path / "c") == []


def test_offline_error_says_how_to_use_a_local_copy(tmp_path):
    with pytest.raises(movielens.DownloadError, match="local_dir") as e:
        movielens.fetch_movielens("ml-100k", str(tmp_path), url_opener=FakeOpener({}))
    assert isinstance(e.value, records.InputError)  # the CLI reports InputErrors and exits non-zero


@pytest.mark.parametrize("member", ["../evil.txt", "ml-100k/../../evil.txt", "/tmp/evil.txt"])
def test_path_traversal_is_refused(tmp_path, member):
    data = _zip({**{f"ml-100k/{f}": d for f, d in ML100K_FILES.items()}, member: b"x"})
    dest = tmp_path / "dest"
    opener = FakeOpener({movielens.archive_url("ml-100k"): data})
    with pytest.raises(movielens.DownloadError, match="unsafe member"):
        movielens.fetch_movielens("ml-100k", str(dest), url_opener=opener, expected_md5=hashlib.md5(data).hexdigest())
    assert not (tmp_path / "evil.txt").exists()
    assert not (dest / "ml-100k").exists()


def test_file_url_opener(tmp_path):
    """The default urllib path also works with a file:// URL behind a custom base."""
    import urllib.request

    data = _archive()
    served = tmp_path / "served"
    served.mkdir()
    (served / "ml-100k.zip").write_bytes(data)

    def opener(url: str):
        return urllib.request.urlopen(pathlib.Path(served / url.rsplit("/", 1)[1]).as_uri())

    out = movielens.fetch_movielens("ml-100k", str(tmp_path / "dest"), url_opener=opener,
                                    expected_md5=hashlib.md5(data).hexdigest())
    assert sorted(os.listdir(out)) == sorted(ML100K_FILES)
