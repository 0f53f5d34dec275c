"""`segrec` command line: the one adapter from flags to each command's config.

Every subcommand is registered with a function that adds its flags and one
that builds its frozen config dataclass from the parsed flags and runs it.
Library code never reads flags or environment variables; this module (and
trainer/task.py for Vertex AI) is where they are read. Commands that run a
Beam pipeline pass every flag they do not know to Beam as PipelineOptions
(`--runner DataflowRunner --project ...`, `--direct_num_workers 2`, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from trainer import _env  # noqa: F401
from trainer.cli.registry import COMMANDS, UserError

_LOG = logging.getLogger("segrec")


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(
        prog="segrec",
        description="Two-tower recommender with segment-aware retrieval.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_, add_args, _, beam) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_,
            description=help_ + ("\n\nUnknown flags are passed to Apache Beam as PipelineOptions." if beam else ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_args(p)
    return parser


def _load_commands() -> None:
    # Importing the adapter modules registers their commands.
    from trainer.cli import (  # noqa: F401
        data_commands,
        demo_command,
        frontend_command,
        model_commands,
        score_command,
        segments_commands,
        serving_commands,
        vertex_command,
    )


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Beam's GCP I/O module warns on the root logger when the optional GCP
    # client libraries are absent; they are only needed for gs:// and BigQuery.
    logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    _, _, run, beam = COMMANDS[args.command]
    if unknown and not beam:
        parser.error(f"unrecognized arguments for {args.command}: {' '.join(unknown)}")
    setup_logging(args.verbose)
    from beam_pipelines.sources.records import InputError

    try:
        code = run(args, unknown)
    except (UserError, InputError, ValueError, FileNotFoundError) as err:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"segrec {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segrec {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def command_names() -> list:
    _load_commands()
    return sorted(COMMANDS)
