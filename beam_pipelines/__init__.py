"""segrec Beam pipelines: preprocessing, batch scoring, segment refresh."""

from trainer import _env  # noqa: F401  (must run before tensorflow is imported)
