"""segments.json: the one module that reads and writes it.

`segrec train` writes it into the run dir, `segrec export` copies it beside
the model (or a refreshed one given by --segments-file), `segrec segments
refresh` writes new versions of it, and the server, the frontend, batch
scoring and the reports read it. Schema (version SCHEMA_VERSION):

    {"schema_version": 1, "num_segments": K, "embedding_dim": d,
     "segments": [{"id": 0..K-1, "centroid": [d floats], "size": int,
                   "label": str, "top_categories": [...], "top_items": [...],
                   "attributes": {...}, ...}, ...],
     "quality": {...}, ...}

Older or hand-made files may hold "centroids" [K][d] instead of per-segment
centroids; `centroids()` accepts both.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from trainer.contracts import SEGMENTS_FILE

SCHEMA_VERSION = 1


def _gfile():
    import tensorflow as tf  # gs:// paths; imported when a file is touched

    return tf.io.gfile


def save(doc: dict, path: str) -> None:
    """Writes `doc` as segments.json at `path` (a file path)."""
    with _gfile().GFile(path, "w") as f:
        f.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def load(path: str, flag: str = "") -> dict:
    """The document at `path`; a ValueError naming the file (and the flag) when it is missing or not JSON."""
    where = f"{flag} {path}".strip()
    gfile = _gfile()
    if not gfile.exists(path):
        raise ValueError(f"{where}: no such file")
    try:
        with gfile.GFile(path) as f:
            doc = json.load(f)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: not a segments.json (a JSON object)")
    version = doc.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ValueError(f"{where}: segments.json schema_version {version} is not {SCHEMA_VERSION}")
    return doc


def load_beside(directory: str) -> Optional[dict]:
    """The segments.json in a run or export version dir, or None if it has none."""
    path = os.path.join(directory, SEGMENTS_FILE) if "://" not in directory else directory.rstrip("/") + "/" + SEGMENTS_FILE
    return load(path) if _gfile().exists(path) else None


def centroids(doc: dict, source: str = SEGMENTS_FILE) -> np.ndarray:
    """[K, d] float32 centroids: "centroids" [K][d] when present, else segments[].centroid by id.

    Raises a ValueError naming `source` when ids are not 0..K-1 or the numbers
    are not a finite [K][d] array.
    """
    try:
        if "centroids" in doc:
            out = np.array(doc["centroids"], np.float32)
        else:
            entries = sorted(doc["segments"], key=lambda s: int(s["id"]))
            ids = [int(s["id"]) for s in entries]
            if ids != list(range(len(ids))):
                raise ValueError(f"{source}: segment ids must be 0..K-1, got {ids}")
            out = np.array([s["centroid"] for s in entries], np.float32)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{source}: not a segments.json (needs segments[].id and .centroid, or centroids "
                         f"[K][d]): {type(e).__name__} {e}") from e
    except ValueError as e:
        if str(e).startswith(source):
            raise
        raise ValueError(f"{source}: centroids are not a [K][d] array of numbers ({e})") from e
    if out.ndim != 2 or not np.all(np.isfinite(out)):
        raise ValueError(f"{source}: centroids must be a finite [K][d] array, got shape {out.shape}")
    return out


def labels(doc: Optional[dict]) -> dict:
    """{segment id: label} ({} for None or a document without labels)."""
    if not doc:
        return {}
    return {int(s.get("id", i)): str(s.get("label", f"segment {i}")) for i, s in enumerate(doc.get("segments", ()))}


def label_list(doc: dict) -> list:
    """Labels in segment-id order."""
    return [s["label"] for s in sorted(doc["segments"], key=lambda s: s["id"])]


def by_id(doc: Optional[dict]) -> dict:
    """{segment id: the segment's entry}."""
    return {int(s["id"]): s for s in (doc or {}).get("segments", ()) if "id" in s}
