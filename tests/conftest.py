"""Shared fixtures: the seeded synthetic dataset, MovieLens 100K, clean Keras state."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any test imports tensorflow)

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_DATA = pathlib.Path(__file__).resolve().parent / "data"


def ml100k_dir() -> pathlib.Path | None:
    """The real MovieLens 100K files: $SEGREC_ML100K_DIR, else ../shared/data/ml-100k."""
    env = os.environ.get("SEGREC_ML100K_DIR")
    path = pathlib.Path(env) if env else REPO.parent / "shared" / "data" / "ml-100k"
    return path if (path / "u.data").exists() else None


@pytest.fixture(scope="session")
def ml100k() -> pathlib.Path:
    path = ml100k_dir()
    if path is None:
        pytest.skip("MovieLens 100K not found (set SEGREC_ML100K_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_generated(tmp_path_factory) -> pathlib.Path:
    """A tiny seeded synthetic dataset with planted segments (generic CSV layout)."""
    from beam_pipelines.sources import synthetic

    out = tmp_path_factory.mktemp("generated")
    synthetic.generate(synthetic.GenerateConfig(output_dir=str(out), size="tiny", seed=7))
    return out


@pytest.fixture(autouse=True)
def _clear_keras_session():
    yield
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        tf.keras.backend.clear_session()
    if "keras" in sys.modules:
        import keras

        keras.backend.clear_session()
