"""segrec serving: export, development gRPC server, client."""

from trainer import _env  # noqa: F401  (must run before tensorflow is imported)
