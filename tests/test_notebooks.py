"""The notebooks under notebooks/: executed end to end on small settings (the
same kernel a person gets: python3 from this venv's ipykernel), and every
notebook in the repository committed with its outputs stripped.

01_segments needs MovieLens 100K (never committed: its licence forbids
redistribution): skipped, with the reason, where no copy is at
$SEGREC_ML100K_DIR or ../shared/data/ml-100k — like every MovieLens test.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest
from conftest import REPO, ml100k_dir

NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 600
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Directories that hold no notebooks of ours (venvs, builds, run outputs).
SKIP_DIRS = {"build", "dist", "out", "runs", "node_modules", "__pycache__"}

SMALL = {
    "SEGREC_NB_ENCODER": "tiny",
    "SEGREC_NB_EPOCHS": "2",
    "SEGREC_NB_MAX_EXAMPLES": "4",
    "SEGREC_NB_PROJECTION": "pca",
}
SMALL_SERVING = {
    "SEGREC_NB_ENCODER": "tiny",
    "SEGREC_NB_EPOCHS": "1",
    "SEGREC_NB_DATA_SIZE": "tiny",
    "SEGREC_NB_INDEX": "brute_force",
}


def execute(name: str, env: dict, monkeypatch):
    """Runs notebooks/<name> in a fresh python3 kernel with cwd notebooks/ and `env` set.

    Raises nbclient's CellExecutionError (the failing cell and its traceback) on
    the first cell that errors.
    """
    import nbformat
    from nbclient import NotebookClient

    # The kernel is a child of this process: it inherits the environment. Drop
    # knobs a developer may have exported so the small settings are what runs.
    for key in [k for k in os.environ if k.startswith("SEGREC_NB_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def errors(nb) -> list:
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" for o in cell.get("outputs", []) if o.output_type == "error"]


def stdout(nb) -> str:
    return "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for o in cell.get("outputs", []) if o.output_type == "stream" and o.get("name") == "stdout")


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for o in cell.get("outputs", []))


@pytest.fixture
def ml100k_or_skip() -> pathlib.Path:
    path = ml100k_dir()
    if path is None:
        pytest.skip("MovieLens 100K not found (set SEGREC_ML100K_DIR or put it in ../shared/data/ml-100k)")
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_01_segments_executes_and_writes_its_figures(ml100k_or_skip, tmp_path, monkeypatch):
    out = tmp_path / "nb01"
    nb = execute("01_segments.ipynb", {**SMALL, "SEGREC_ML100K_DIR": str(ml100k_or_skip),
                                       "SEGREC_NB_OUTPUT_DIR": str(out)}, monkeypatch)
    assert errors(nb) == []
    figures = ["segment_sizes.png", "user_embeddings_2d.png", "segment_genre_heatmap.png", "recall_per_segment.png"]
    for name in figures:
        data = (out / "figures" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
    assert images(nb) == len(figures)  # each figure is also shown inline

    summary = json.loads((out / "notebook_summary.json").read_text())
    assert summary["num_users"] == 943  # one point per MovieLens 100K user
    assert sum(summary["segment_sizes"]) == 943 and len(summary["segment_sizes"]) == 6
    assert set(summary["models"]) == {"segrec", "popularity", "ease", "id_two_tower"}
    for model, per_group in summary["recall_per_segment"].items():
        assert all(0.0 <= v <= 1.0 for v in per_group.values()), model
    assert (out / "evaluation" / "report.md").is_file()
    assert (out / "segment_profiles.csv").read_text().count("\n") == 1 + 6  # header + one row per segment

    text = stdout(nb)
    assert "preprocess finished" in text and "train finished" in text
    assert "segrec's recall@50 is above every baseline in" in text


@pytest.mark.slow
@pytest.mark.integration
def test_02_serving_executes_recommends_and_stops_the_server(tmp_path, monkeypatch):
    out = tmp_path / "nb02"
    nb = execute("02_serving.ipynb", {**SMALL_SERVING, "SEGREC_NB_OUTPUT_DIR": str(out)}, monkeypatch)
    assert errors(nb) == []

    text = stdout(nb)
    assert "segrec serve is up" in text
    assert "segrec serve stopped with exit code 0" in text
    summary = json.loads((out / "notebook_summary.json").read_text())
    assert summary["server_exit_code"] == 0
    assert (out / "models" / "segrec" / "1" / "saved_model.pb").is_file()
    history = set(summary["user"]["history"])
    assert len(summary["default"]) == 10 and not history & set(summary["default"])
    assert set(summary["by_beta"]) == {"0", "0.5", "1"}
    for beta, ids in summary["by_beta"].items():
        assert len(ids) == 10 == len(set(ids)) and not history & set(ids), beta
    jaccard = summary["jaccard"]
    assert all(jaccard[f"beta={b}"][f"beta={b}"] == 1.0 for b in ("0", "0.5", "1"))


def repo_notebooks() -> list:
    """Every notebook git would commit (tracked, or untracked and not ignored); a
    walk of the tree, minus hidden and build/output dirs, outside a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.ipynb"],
                                cwd=REPO, capture_output=True, check=True).stdout.decode()
        return sorted(REPO / p for p in listed.split("\0") if p and (REPO / p).is_file())
    except (OSError, subprocess.CalledProcessError):
        found = []
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS]
            found += [pathlib.Path(root) / f for f in files if f.endswith(".ipynb")]
        return sorted(found)


def strip_outputs(path) -> bool:
    """Clears outputs and execution counts in place; True when the file changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count, changed = [], None, True
    if changed:
        nbformat.write(nb, path)
    return changed


def test_every_notebook_in_the_repo_is_committed_without_outputs():
    import nbformat

    notebooks = repo_notebooks()
    names = {p.relative_to(REPO).as_posix() for p in notebooks}
    assert {"notebooks/01_segments.ipynb", "notebooks/02_serving.ipynb"} <= names, names
    dirty = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
                dirty.append(f"{path.relative_to(REPO)} cell {i}")
    assert not dirty, ("notebooks must be committed with outputs stripped "
                       "(.venv/bin/python tests/test_notebooks.py FILE...): " + ", ".join(dirty))


if __name__ == "__main__":  # python tests/test_notebooks.py notebooks/*.ipynb  -> strips outputs in place
    import sys

    for arg in sys.argv[1:]:
        print(f"{arg}: {'stripped' if strip_outputs(arg) else 'already clean'}")
