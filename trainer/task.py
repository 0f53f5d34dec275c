"""The module Vertex AI runs: `python -m trainer.task [COMMAND] ARGS...`.

Vertex AI's Python-package training runs this module with the job's args.
With no command it trains (`segrec train ARGS`); any `segrec` command can be
named first. Like the CLI, this entry point is where the environment (TF_CONFIG,
CLUSTER_SPEC, AIP_*) is read.
"""

from __future__ import annotations

import sys

from trainer.cli import main as cli


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = set(cli.command_names())
    if not argv or argv[0] not in commands | {"-h", "--help"}:
        argv = ["train"] + argv
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
