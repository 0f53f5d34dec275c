"""Keeping a long-running `segrec serve` at one model's memory across hot swaps.

A swap holds two versions while the new one loads; after the old one is
unloaded its memory must go back to the OS, or every server settles near two
models' worth. Once nothing references the old version (the model manager
waits for that: model_manager.ModelManager._release_unloaded), two things
still kept its memory (measured with a MiniLM export, see
bench/results/soak.md): oneDNN's caches of re-laid-out weights, which outlive
the model they were made for, and glibc's malloc, which keeps freed pages in
its arenas. So:

    ONEDNN_ENV          `segrec serve` (the CLI, before TensorFlow is
                        imported) sets it to "0" unless the environment
                        says otherwise: oneDNN's rewrites off; on CPUs
                        without AVX-512 they did not change serving latency
                        (bench/results/soak.md)
    release_unloaded()  while an unloaded version is pending: collect garbage, clear
                        TensorFlow's kernel cache, hand free pages back
                        (malloc_trim; a no-op where libc has none)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

_LOG = logging.getLogger("segrec.serve")
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def release_unloaded() -> dict:
    """Returns what was done: {"gc": objects collected, "kernel_cache": bool, "malloc_trim": bool}."""
    done = {"gc": gc.collect(), "kernel_cache": False, "malloc_trim": False}
    if "tensorflow" in sys.modules:
        try:
            from tensorflow.python.eager import context

            context.context().clear_kernel_cache()
            done["kernel_cache"] = True
        except Exception as err:  # noqa: BLE001  (a TF without it: nothing to clear)
            _LOG.debug("kernel cache not cleared: %s", err)
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
        done["malloc_trim"] = True
    return done
