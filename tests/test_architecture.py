"""The layering of ARCHITECTURE.md holds: import-linter's contracts, ruff, one name per module.

`.importlinter` states the layers (CLI/demo > Beam pipelines > serving >
trainer core, and inside the core evaluation > training > segments > model >
data > names) and forbids import cycles between sibling modules or packages
at any depth; `ruff.toml` keeps pyflakes' checks and import order.
"""

from __future__ import annotations

import collections
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "serving", "beam_pipelines")
BIN = pathlib.Path(sys.executable).parent
# os.environ.get(...), os.getenv(...), or os.environ[...] that is not assigned to.
READS_ENV = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[[^\]]+\](?!\s*=[^=])")


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_import_contracts_are_kept():
    proc = _run("lint-imports", "--no-cache")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout, proc.stdout[-3000:]


def test_ruff_is_clean():
    proc = _run("ruff", "check", ".")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_no_two_modules_share_a_name():
    names = collections.defaultdict(list)
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name not in ("__init__.py", "__main__.py"):
                names[path.stem].append(str(path.relative_to(ROOT)))
    clashes = {name: paths for name, paths in names.items() if len(paths) > 1}
    assert not clashes, f"modules sharing a name: {clashes}"


def test_library_code_reads_no_environment_variables():
    """STYLE: only the CLI and the Vertex AI entry point read the environment (and _env.py sets it)."""
    allowed = {"trainer/_env.py", "trainer/task.py"}
    offenders = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if rel in allowed or rel.startswith("trainer/cli/"):
                continue
            code = "\n".join(line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())
            if READS_ENV.search(code):
                offenders.append(rel)
    assert not offenders, f"library modules reading the environment: {offenders}"
