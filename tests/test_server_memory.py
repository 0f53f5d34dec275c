"""A swapped-out version's memory is handed back (serving/server/memory.py)."""

import os
import subprocess
import sys
import weakref

import pytest

from serving.server import memory
from serving.server import model_manager as mm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("preset", [None, "1"])
def test_segrec_serve_turns_onednn_off_before_tensorflow_is_imported(tmp_path, preset):
    """The real CLI path; an operator's explicit setting stands."""
    code = (
        "import os, sys\n"
        "from trainer.cli import main\n"
        "rc = main.main(['serve', '--model-base-path', sys.argv[1] + '/missing'])\n"
        "print('RESULT', rc, 'tensorflow' in sys.modules, os.environ.get('TF_ENABLE_ONEDNN_OPTS'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != memory.ONEDNN_ENV}
    if preset:
        env[memory.ONEDNN_ENV] = preset
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert line, out.stdout + out.stderr
    # bad --model-base-path: exit 2; TensorFlow not imported yet, the variable already set
    assert line[0] == f"RESULT 2 False {preset or '0'}"


def test_release_unloaded_collects_and_trims():
    class Big:
        pass

    a, b = Big(), Big()
    a.other, b.other = b, a  # a cycle only gc frees
    ref = weakref.ref(a)
    del a, b
    done = memory.release_unloaded()
    assert ref() is None and done["gc"] >= 2
    if sys.platform.startswith("linux"):
        assert done["malloc_trim"] is True


def test_the_manager_releases_memory_once_nothing_holds_the_unloaded_version(tmp_path, monkeypatch):
    """An in-flight call may hold the old version past the swap: the manager keeps collecting at each
    poll until the version is gone, then stops."""
    released = []
    monkeypatch.setattr(memory, "release_unloaded", lambda: released.append(True) or {})
    models = {}

    class Model:  # stands in for the loaded SavedModel
        pass

    def loader(path, version):
        models[version] = Model()
        return mm.LoadedVersion(version, path, models[version], {}, {}, None)

    def write(version):
        d = tmp_path / "segrec" / str(version)
        d.mkdir(parents=True)
        (d / "saved_model.pb").write_text("ok")

    manager = mm.ModelManager(str(tmp_path), loader=loader)
    write(1)
    manager.poll_once()
    assert released == []  # nothing unloaded yet
    in_flight = manager.resolve()  # a request still running on version 1
    old = weakref.ref(models.pop(1))
    write(2)
    manager.poll_once()
    assert manager.resolve().version == 2 and len(released) == 1
    manager.poll_once()
    assert len(released) == 2, "version 1 is still held: the manager keeps trying"
    del in_flight
    manager.poll_once()
    assert len(released) == 3 and old() is None, "the manager itself must not hold the unloaded version"
    manager.poll_once()
    assert len(released) == 3, "nothing pending: no more collections"


def test_the_manager_stops_waiting_for_a_version_something_keeps(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(memory, "release_unloaded", lambda: {})
    monkeypatch.setattr(mm.ModelManager, "RELEASE_POLLS", 3)

    def loader(path, version):
        return mm.LoadedVersion(version, path, object(), {}, {}, None)

    manager = mm.ModelManager(str(tmp_path), loader=loader)
    for v in (1, 2):
        d = tmp_path / "segrec" / str(v)
        d.mkdir(parents=True)
        (d / "saved_model.pb").write_text("ok")
        if v == 1:
            manager.poll_once()
            leaked = manager.resolve()  # noqa: F841  (held for the whole test)
    with caplog.at_level("WARNING", logger="segrec.serve"):
        for _ in range(4):
            manager.poll_once()
    assert "still referenced after 3 polls" in caplog.text
    assert manager._unloaded == []


@pytest.mark.parametrize("setting", ["0", "1"])
def test_onednn_setting_reaches_tensorflow(setting):
    """The variable is the one TensorFlow reads (its start-up notice names it when oneDNN is on)."""
    code = "import trainer, tensorflow as tf; tf.constant(1.0) + 1.0"
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting, TF_CPP_MIN_LOG_LEVEL="0")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    notice = "oneDNN custom operations are on"
    assert (notice in out.stderr) == (setting == "1")


def test_an_idle_batcher_thread_does_not_keep_its_last_batch():
    """After a swap the old version must be freeable: a batcher thread waiting for work holds no task."""
    import gc

    import numpy as np

    from serving.server import batching

    class Version:  # stands in for a LoadedVersion
        pass

    b = batching.Batcher(lambda loaded, signature, inputs: {"y": inputs["x"]}, max_batch_size=8,
                         timeout_s=0.001, num_threads=3)
    try:
        version = Version()
        ref = weakref.ref(version)
        futures = [b.submit(version, "serving_default", {"x": np.array([i])}) for i in range(6)]
        assert [int(f.result(10)["y"][0]) for f in futures] == list(range(6))
        del version, futures
        gc.collect()
        assert ref() is None, "an idle batcher thread still holds the last batch's version"
    finally:
        b.stop()
