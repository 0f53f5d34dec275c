"""segrec trainer: features, data input, towers, segment head, training, evaluation."""

from trainer import _env  # noqa: F401  (must run before tensorflow is imported)
