"""segrec benchmarks: `python -m bench.<name>`; results (ratios against a baseline of the same run) in bench/results/.

Importing this package first sets TF_USE_LEGACY_KERAS (trainer/_env.py), so a
benchmark's own `import tensorflow` always sees it, whatever the import order.
"""

from trainer import _env  # noqa: F401
