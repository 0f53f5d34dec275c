"""Get a MovieLens release onto local disk: a local copy first, else a verified download.

The project does not ship MovieLens (its license forbids redistribution), so
`segrec preprocess --movielens NAME` either points at a directory the user
already has or downloads the official archive from GroupLens. A download is
checked against an MD5 *before* anything is extracted, and extraction refuses
members that would land outside the destination (zip path traversal).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Callable, Optional

from beam_pipelines.sources import records

BASE_URL = "https://files.grouplens.org/datasets/movielens"

_ML100K = ("u.data", "u.item", "u.user", "u.genre")
_MLCSV = ("ratings.csv", "movies.csv")
REQUIRED_FILES = {
    "ml-100k": _ML100K,
    "ml-latest-small": _MLCSV,
    "ml-latest": _MLCSV,
    "ml-20m": _MLCSV,
    "ml-25m": _MLCSV,
    "ml-32m": _MLCSV,
}

# MD5 of archives that never change. The "latest" archives are re-cut by
# GroupLens, and ml-32m's sum is not pinned here, so for those the official
# `<url>.md5` published beside the archive is fetched and compared instead.
PINNED_MD5 = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
}

_CHUNK = 1 << 20


class DownloadError(records.InputError):
    """The dataset could not be fetched or verified; says how to use a local copy."""


UrlOpener = Callable[[str], object]


def required_files(name: str) -> tuple:
    """The files a usable copy of MovieLens `name` must hold."""
    if name not in REQUIRED_FILES:
        raise ValueError(f"unknown MovieLens dataset {name!r}; expected one of {tuple(REQUIRED_FILES)}")
    return REQUIRED_FILES[name]


def archive_url(name: str) -> str:
    required_files(name)
    return f"{BASE_URL}/{name}.zip"


def _missing(name: str, directory: str) -> list:
    return [f for f in required_files(name) if not os.path.isfile(os.path.join(directory, f))]


def fetch_movielens(
    name: str,
    dest_dir: str,
    *,
    local_dir: Optional[str] = None,
    url_opener: Optional[UrlOpener] = None,
    expected_md5: Optional[str] = None,
) -> str:
    """The directory holding MovieLens `name`'s files, downloading only if needed.

    Order: `local_dir` (or `local_dir/<name>`) when given — it must be
    complete, since a user who names a copy does not want a silent download;
    then an already extracted `dest_dir/<name>`; then a download of the
    official zip into `dest_dir`, verified against `expected_md5`, the pinned
    MD5, or the published `<url>.md5`, in that order.
    `url_opener(url)` returns a readable binary response (default:
    urllib.request.urlopen); tests inject one to stay offline.
    """
    required_files(name)
    if local_dir is not None:
        for candidate in (local_dir, os.path.join(local_dir, name)):
            if not _missing(name, candidate):
                return candidate
        raise records.InputError(
            f"{local_dir}: not a complete {name} copy; missing {_missing(name, local_dir)} "
            f"(expected {list(required_files(name))} in it or in {os.path.join(local_dir, name)})"
        )
    target = os.path.join(dest_dir, name)
    if not _missing(name, target):
        return target

    opener = url_opener or _default_opener
    os.makedirs(dest_dir, exist_ok=True)
    url = archive_url(name)
    archive = os.path.join(dest_dir, f"{name}.zip")
    partial = archive + ".part"
    try:
        actual = _download(opener, url, partial, name)
        expected = (expected_md5 or PINNED_MD5.get(name) or _published_md5(opener, url)).lower()
        if actual != expected:
            raise DownloadError(
                f"{url}: MD5 {actual} does not match the expected {expected}; the download is "
                f"corrupt or was tampered with, nothing was extracted. Retry, or download it "
                f"yourself and pass the extracted directory as local_dir (--movielens-dir)."
            )
        os.replace(partial, archive)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
    _safe_extract(archive, dest_dir, name)
    os.remove(archive)
    missing = _missing(name, target)
    if missing:
        raise DownloadError(f"{url}: archive extracted to {target} but lacks {missing}")
    return target


def _default_opener(url: str):
    return urllib.request.urlopen(url, timeout=60)


def _open(opener: UrlOpener, url: str):
    try:
        return opener(url)
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(
            f"cannot download {url} ({e}). If this machine is offline, download the archive "
            f"elsewhere, unzip it, and pass the directory as local_dir (--movielens-dir)."
        ) from e


def _download(opener: UrlOpener, url: str, path: str, name: str) -> str:
    """Stream `url` to `path` with a progress bar; returns the MD5 of the bytes."""
    from tqdm import tqdm

    md5 = hashlib.md5()
    with contextlib.closing(_open(opener, url)) as response, open(path, "wb") as out:
        headers = getattr(response, "headers", None)
        length = headers.get("Content-Length") if headers is not None else None
        with tqdm(total=int(length) if length else None, unit="B", unit_scale=True, desc=name, leave=False) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except OSError as e:
                    raise DownloadError(f"download of {url} broke off ({e}); retry or use local_dir") from e
                if not chunk:
                    break
                out.write(chunk)
                md5.update(chunk)
                bar.update(len(chunk))
    return md5.hexdigest()


def _published_md5(opener: UrlOpener, url: str) -> str:
    """The MD5 in GroupLens' `<url>.md5` ("MD5 (x.zip) = <hex>" or "<hex>  x.zip")."""
    try:
        response = _open(opener, url + ".md5")
    except DownloadError as e:
        raise DownloadError(
            f"{e}. Without the published checksum the archive is not extracted; pass "
            f"expected_md5 if you know it, or unzip it yourself and pass local_dir."
        ) from e
    with contextlib.closing(response):
        text = response.read(4096).decode("ascii", errors="replace")
    match = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if not match:
        raise DownloadError(f"{url}.md5 holds no MD5 ({text[:80]!r}); refusing to extract an unverified archive")
    return match.group(0)


def _safe_extract(archive: str, dest_dir: str, name: str) -> None:
    """Extract into a scratch dir beside the target, then move `<name>/` into place.

    Every member is checked before any is written: absolute paths, ".." parts
    and symlinks are refused, so a hostile archive cannot write elsewhere.
    """
    root = os.path.realpath(dest_dir)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = os.path.realpath(os.path.join(root, info.filename))
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if os.path.isabs(info.filename) or ".." in info.filename.replace("\\", "/").split("/") or is_link \
                    or not (target == root or target.startswith(root + os.sep)):
                raise DownloadError(f"{archive}: refusing unsafe member {info.filename!r} (outside {dest_dir})")
        scratch = tempfile.mkdtemp(prefix=f".{name}-", dir=dest_dir)
        try:
            zf.extractall(scratch)
            # Official archives hold a top-level "<name>/"; accept a flat one too.
            inner = os.path.join(scratch, name)
            source = inner if os.path.isdir(inner) else scratch
            final = os.path.join(dest_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)  # an incomplete earlier copy (complete ones returned early)
            shutil.move(source, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
