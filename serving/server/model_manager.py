"""Versions of one model under a base path: load, poll, swap, report.

    <base_path>/<model_name>/<N>/saved_model.pb (+ segments.json, model_card.md)

The manager serves the highest loaded version by default and keeps every
version a label points to (`stable=1,canary=2`) loaded too. A poll thread
lists the numeric dirs every `poll_seconds`; a new version is loaded in that
thread, off the request path, and published by replacing one immutable
`Snapshot` under a lock. A request takes the current snapshot once and holds
its `LoadedVersion`, so an old version answers its in-flight requests after a
swap (Python frees it when the last reference goes).

Each loaded version of a text export gets its own text-vector cache
(text_cache.py; `text_cache_size` entries, 0 = none): a new version starts
empty, and a version's cache is emptied when it is unloaded or replaced.

A version that fails to load (corrupt, missing ops) never replaces the one
being served; its state is END with the error, as GetModelStatus reports it,
and it is retried only when its saved_model.pb changes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import weakref
from typing import Callable, Mapping, Optional

from serving.export import layout
from serving.server import memory
from serving.server import text_cache as tc
from trainer.contracts import SAVED_MODEL
from trainer.segments import document as segments_doc

_LOG = logging.getLogger("segrec.serve")

# ModelVersionStatus.State values of tensorflow_serving/apis/get_model_status.proto.
START, LOADING, AVAILABLE, UNLOADING, END = 10, 20, 30, 40, 50



class NoVersionError(LookupError):
    """No version can answer: nothing loaded, or the asked-for version/label is not."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code  # "FAILED_PRECONDITION" | "NOT_FOUND" | "INVALID_ARGUMENT"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    dtype: str  # numpy dtype name: "object" for strings, "int32", "float32", ...
    rank: int  # -1 = unknown rank
    dims: tuple = ()  # the static size of each axis (None = any); () when the rank is unknown


def _dims(shape) -> tuple:
    return () if shape.rank is None else tuple(shape.as_list())


@dataclasses.dataclass
class LoadedVersion:
    """One loaded SavedModel version and what validation needs to know of it.

    inputs / outputs: signature -> {name: InputSpec}; k_max, default_k,
    default_beta from the model card (None when absent); segments: the
    version's segments.json (None when absent); signature_defs: the
    SignatureDefMap proto GetModelMetadata returns.
    """

    version: int
    path: str
    model: object
    inputs: dict
    outputs: dict
    signature_defs: object
    k_max: Optional[int] = None
    default_k: Optional[int] = None
    default_beta: Optional[float] = None
    segments: Optional[dict] = None
    text_cache: Optional[tc.TextVectorCache] = None  # set by ModelManager for text exports

    def call(self, signature: str, inputs: Mapping) -> dict:
        """inputs: name -> numpy array; returns name -> numpy array."""
        import tensorflow as tf

        fn = self.model.signatures[signature]
        out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class VersionState:
    state: int
    error_code: int = 0  # google.rpc.Code: 0 OK, 3 INVALID_ARGUMENT, 13 INTERNAL ...
    error_message: str = ""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    loaded: Mapping  # version -> LoadedVersion
    states: Mapping  # version -> VersionState (every version ever seen)


def load_version(path: str, version: int) -> LoadedVersion:
    """Loads one version dir with the export's custom ops registered."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2

    model = layout.load_exported(path)
    inputs, outputs = {}, {}
    for name, fn in model.signatures.items():
        specs = fn.structured_input_signature[1]
        inputs[name] = {k: InputSpec(tf.as_dtype(s.dtype).as_numpy_dtype.__name__
                                     if s.dtype != tf.string else "object", s.shape.rank if s.shape.rank is not None
                                     else -1, _dims(s.shape)) for k, s in specs.items()}
        outputs[name] = {k: InputSpec(s.dtype.name, s.shape.rank if s.shape.rank is not None else -1)
                         for k, s in fn.structured_outputs.items()}
    saved = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(path, SAVED_MODEL), "rb") as f:
        saved.ParseFromString(f.read())
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for name, sdef in saved.meta_graphs[0].signature_def.items():
        if name in model.signatures:  # drop TF's internal __saved_model_init_op
            sig_map.signature_def[name].CopyFrom(sdef)
    loaded = LoadedVersion(version=version, path=path, model=model, inputs=inputs, outputs=outputs,
                           signature_defs=sig_map)
    info = layout.read_export_info(path)
    loaded.k_max = info.get("k_max", loaded.k_max)
    loaded.default_k = info.get("k", loaded.default_k)
    loaded.default_beta = info.get("beta", loaded.default_beta)
    loaded.segments = segments_doc.load_beside(path)
    return loaded


def _drop_text_cache(loaded: LoadedVersion) -> None:
    """Empties a version's cache when it stops being served (its in-flight calls just miss)."""
    if loaded.text_cache is not None:
        loaded.text_cache.clear()


def list_versions(model_dir: str) -> dict:
    """version -> fingerprint of its saved_model.pb, for the numeric dirs that have one."""
    found = {}
    try:
        names = os.listdir(model_dir)
    except FileNotFoundError:
        return found
    for name in names:
        if not name.isdigit():  # skips the exporter's .tmp-* dirs
            continue
        pb = os.path.join(model_dir, name, SAVED_MODEL)
        try:
            st = os.stat(pb)
        except FileNotFoundError:
            continue
        found[int(name)] = (st.st_mtime_ns, st.st_size)
    return found


class ModelManager:
    """Loads and swaps the versions of `<base_path>/<model_name>/`.

    loader(path, version) -> LoadedVersion is injectable for tests. labels:
    label -> version. on_change(snapshot) is called after each swap.
    """

    def __init__(self, base_path: str, model_name: str = "segrec", poll_seconds: float = 2.0,
                 labels: Optional[Mapping] = None, loader: Callable = load_version,
                 on_change: Optional[Callable] = None, text_cache_size: int = 0):
        self.model_dir = os.path.join(base_path, model_name)
        self.text_cache_size = int(text_cache_size)
        self.model_name = model_name
        self.poll_seconds = poll_seconds
        self.labels = dict(labels or {})
        self._loader = loader
        self._on_change = on_change
        # Unloaded versions not yet freed (an in-flight call or a batcher thread may still hold one):
        # weak references, and the polls left to wait for them (see _release_unloaded).
        self._unloaded: list = []
        self._release_polls = 0
        self._lock = threading.Lock()
        self._snapshot = Snapshot(loaded={}, states={})
        self._tried: dict = {}  # version -> fingerprint last attempted
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --- reading (request path) -------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def resolve(self, version: Optional[int] = None, label: str = "") -> LoadedVersion:
        """The version a request asks for (None and no label: the latest loaded)."""
        snap = self._snapshot
        if label:
            if label not in self.labels:
                raise NoVersionError(
                    f"model_spec.version_label: unknown label {label!r}; known: {sorted(self.labels) or 'none'}",
                    "INVALID_ARGUMENT")
            version = self.labels[label]
        if not snap.loaded:
            raise NoVersionError(f"no version of model {self.model_name!r} is loaded yet "
                                 f"(looked in {self.model_dir})", "FAILED_PRECONDITION")
        if version is None:
            return snap.loaded[max(snap.loaded)]
        if version not in snap.loaded:
            raise NoVersionError(f"model_spec.version: version {version} of model {self.model_name!r} is not "
                                 f"loaded; loaded: {sorted(snap.loaded)}", "NOT_FOUND")
        return snap.loaded[version]

    # --- polling ------------------------------------------------------------------------
    def poll_once(self) -> Snapshot:
        """One pass: load what is new or changed, unload what is gone or no longer wanted."""
        on_disk = list_versions(self.model_dir)
        failed = self._failed(on_disk)
        for version in sorted(self._wanted(on_disk, failed), reverse=True):
            if version in self._snapshot.loaded and self._tried.get(version) == on_disk[version]:
                continue
            self._tried[version] = on_disk[version]
            self._set_state(version, VersionState(LOADING))
            path = os.path.join(self.model_dir, str(version))
            start = time.time()
            try:
                loaded = self._loader(path, version)
            except Exception as err:  # noqa: BLE001  (any load failure keeps the old version)
                message = f"{type(err).__name__}: {err}".strip()[:2000]
                _LOG.error("version %d failed to load from %s: %s", version, path, message)
                self._set_state(version, VersionState(END, error_code=3, error_message=message))
                continue
            _LOG.info("loaded version %d from %s in %.1fs", version, path, time.time() - start)
            self._publish(version, loaded)
        self._unload_unwanted(on_disk)
        self._release_unloaded()
        return self._snapshot

    RELEASE_POLLS = 30  # polls to wait for an unloaded version's last reference before giving up on it

    def _forget(self, loaded: LoadedVersion) -> None:
        """`loaded` is no longer served: its memory is handed back once nothing holds it."""
        self._unloaded.append(weakref.ref(loaded))
        self._release_polls = self.RELEASE_POLLS

    def _release_unloaded(self) -> None:
        """While unloaded versions are pending: collect garbage, clear TF's kernel cache and trim malloc
        (serving/server/memory.py), each poll until every one of them is freed (their SavedModels hold
        reference cycles, so only a collection frees them; an in-flight call may hold one a little longer).
        Liveness is read before collecting, so the pass that sees the last one gone also collects it."""
        if not self._unloaded:
            return
        alive = [r for r in self._unloaded if r() is not None]  # before collecting: see the docstring
        done = memory.release_unloaded()
        self._release_polls -= 1
        if not alive:
            _LOG.info("memory of the unloaded version(s) released: %s", done)
        elif self._release_polls <= 0:
            _LOG.warning("%d unloaded version(s) still referenced after %d polls; their memory stays in use",
                         len(alive), self.RELEASE_POLLS)
        else:
            self._unloaded = alive
            return
        self._unloaded = []

    def _failed(self, on_disk: dict) -> set:
        """Versions whose load failed with the files now on disk (not retried until they change)."""
        states = self._snapshot.states
        return {v for v in on_disk if v in states and states[v].error_code and self._tried.get(v) == on_disk[v]}

    def _wanted(self, on_disk: dict, failed: set) -> set:
        """The latest version that has not failed, plus every labelled version on disk."""
        ok = [v for v in on_disk if v not in failed]
        wanted = {v for v in self.labels.values() if v in ok}
        if ok:
            wanted.add(max(ok))
        return wanted

    def _unload_unwanted(self, on_disk: dict) -> None:
        snap = self._snapshot
        latest = max(snap.loaded) if snap.loaded else None
        keep = {v for v in snap.loaded if v in on_disk and (v == latest or v in self.labels.values())}
        gone = set(snap.loaded) - keep
        if not gone:
            return
        with self._lock:
            loaded = {v: lv for v, lv in self._snapshot.loaded.items() if v not in gone}
            states = dict(self._snapshot.states)
            for v in gone:
                states[v] = VersionState(END)
                self._tried.pop(v, None)  # reloaded if wanted again (a newer version deleted)
            self._snapshot = Snapshot(loaded=loaded, states=states)
        for v in gone:
            _drop_text_cache(snap.loaded[v])
            self._forget(snap.loaded[v])
            _LOG.info("unloaded version %d", v)
        del snap, loaded  # this thread's last references; poll_once releases the memory next
        self._changed()

    def _publish(self, version: int, loaded: LoadedVersion) -> None:
        self._attach_text_cache(loaded)
        with self._lock:
            snap = self._snapshot
            self._snapshot = Snapshot(loaded={**snap.loaded, version: loaded},
                                      states={**snap.states, version: VersionState(AVAILABLE)})
        replaced = snap.loaded.get(version)
        if replaced is not None and replaced is not loaded:  # the version's saved_model.pb changed
            _drop_text_cache(replaced)
            self._forget(replaced)
        self._changed()

    def _attach_text_cache(self, loaded: LoadedVersion) -> None:
        """A new, empty text-vector cache for a version that has encode_text + serving_text_vector."""
        if self.text_cache_size > 0 and loaded.text_cache is None and tc.has_split(loaded.inputs):
            loaded.text_cache = tc.TextVectorCache(self.text_cache_size)

    def _set_state(self, version: int, state: VersionState) -> None:
        with self._lock:
            snap = self._snapshot
            self._snapshot = Snapshot(loaded=snap.loaded, states={**snap.states, version: state})

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._snapshot)

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """First poll in the caller's thread (so serving starts loaded), then a poll thread."""
        self.poll_once()
        self._thread = threading.Thread(target=self._run, name="segrec-model-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001  (a bad poll must not end polling)
                _LOG.exception("polling %s failed", self.model_dir)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
