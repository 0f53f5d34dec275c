"""Output-dir helpers every pipeline driver shares: text files through Beam's
FileSystems (local paths and gs:// alike) and the "refuse to mix a new run's
shards with an old one's unless --overwrite" rule."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from apache_beam.io.filesystems import FileSystems

from beam_pipelines.sources import records


@dataclasses.dataclass(frozen=True)
class PipelineSummary:
    """What a pipeline run wrote: its output dir, the checked stats.json
    content, logical name -> written paths, and the wall time."""

    output_dir: str
    stats: dict
    files: dict  # logical name -> list of paths
    seconds: float


def read_text(path: str) -> str:
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    with FileSystems.create(path) as f:
        f.write(text.encode("utf-8"))


def existing_outputs(output_dir: str, globs: Sequence[str]) -> list:
    """Paths under `output_dir` matching any of `globs`, sorted."""
    found = []
    for pattern in globs:
        found += [m.path for m in FileSystems.match([FileSystems.join(output_dir, pattern)])[0].metadata_list]
    return sorted(found)


def prepare_output_dir(output_dir: str, globs: Sequence[str], overwrite: bool, what: str) -> None:
    """Refuses to write into `output_dir` when it already holds `what` (files
    matching `globs`) unless `overwrite`, which deletes them first."""
    old = existing_outputs(output_dir, globs)
    if old and not overwrite:
        raise records.InputError(
            f"output dir {output_dir} already holds {what} ({len(old)} files, e.g. {old[0]}); "
            "pass --overwrite to replace it or choose another --output-dir")
    if old:
        FileSystems.delete(old)
    if "://" not in output_dir:
        os.makedirs(output_dir, exist_ok=True)
