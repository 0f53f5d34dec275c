"""CLI adapters of the data commands: `segrec generate` and `segrec preprocess`."""

from __future__ import annotations

import argparse
import os

from trainer.cli.registry import UserError, command

MOVIELENS_SOURCES = ("ml-100k", "ml-latest-small", "ml-latest", "ml-20m", "ml-25m", "ml-32m")
SOURCES = ("generic",) + MOVIELENS_SOURCES


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    from beam_pipelines.sources.synthetic import SIZES

    p.add_argument("--output-dir", required=True, help="where the generated files go")
    p.add_argument("--size", default="small", choices=sorted(SIZES), help="preset size (default: small)")
    p.add_argument("--users", type=int, help="override the preset's number of users")
    p.add_argument("--items", type=int, help="override the preset's number of items")
    p.add_argument("--interactions", type=int, help="override the preset's number of interactions")
    p.add_argument("--num-segments", type=int, default=6, help="planted user segments (default: 6)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--format", default="csv", choices=("csv", "jsonl", "parquet"))


@command("generate", "Write the embedded synthetic dataset (planted segments) in the generic input format.")(_add_generate_args)
def run_generate(args: argparse.Namespace, beam_args) -> int:
    from beam_pipelines.sources import synthetic

    config = synthetic.GenerateConfig(
        output_dir=args.output_dir,
        size=args.size,
        num_users=args.users,
        num_items=args.items,
        num_interactions=args.interactions,
        num_segments=args.num_segments,
        seed=args.seed,
        format=args.format,
    )
    summary = synthetic.generate(config, progress=True)
    print(format_generate_summary(summary))
    return 0


def format_generate_summary(summary) -> str:
    lines = [
        f"generated {summary.num_interactions:,} interactions of {summary.num_users:,} users on "
        f"{summary.num_items:,} items, {summary.num_segments} planted segments -> {summary.output_dir}",
        "  segments: " + ", ".join(summary.segment_names),
    ]
    lines += [f"  {name:<14} {path}" for name, path in sorted(summary.files.items())]
    return "\n".join(lines)


def add_raw_input_args(src) -> None:
    """The raw-input flags (sources, layout, column mapping) of every command
    that reads raw logs: preprocess, score, segments refresh. `format_flag`
    spells the input-format flag (score and refresh call it --input-format,
    their --format being the output's); its dest is always `input_format`."""
    src.add_argument("--source", default="generic", choices=SOURCES,
                     help="input layout: generic CSV/JSONL/Parquet, or a MovieLens release (default: generic)")
    src.add_argument("--input-dir", help="generic: a dir holding interactions.*, items.* and optionally users.* "
                     "(what `segrec generate` writes); MovieLens: a local copy of the release's files")
    src.add_argument("--interactions", help="generic: interactions file (glob allowed)")
    src.add_argument("--items", help="generic: item catalog file")
    src.add_argument("--users", help="generic: user profiles file (optional)")
    src.add_argument("--input-format", dest="input_format", choices=("csv", "jsonl", "parquet"),
                     help="generic: input format of the raw files (default: from extension)")
    src.add_argument("--map", action="append", default=[], metavar="[KIND.]FIELD=COLUMN",
                     help="generic column mapping, e.g. --map user_id=uid or --map interactions.timestamp=ts (repeatable)")
    src.add_argument("--download", action="store_true",
                     help="MovieLens: download the official archive (checksum-verified) when --input-dir has no copy")
    src.add_argument("--cache-dir", default=os.path.join("~", ".cache", "segrec"), help="where --download puts archives")
    src.add_argument("--min-timestamp", type=int, help="rows before this epoch second are dead-lettered (default 1)")
    src.add_argument("--max-timestamp", type=int, help="rows after this epoch second are dead-lettered (default 2100-01-01)")


def add_query_args(q) -> None:
    """How a user's events become query features (history length, titles in
    user_text, implicit positives): shared by preprocess, score and refresh."""
    q.add_argument("--max-history", type=int, default=None, help="history items kept per query (default 50)")
    q.add_argument("--text-history", type=int, default=None,
                   help="recent item titles folded into user_text after the profile (default 0: the profile "
                        "alone; the history encoder reads those items, and short texts keep the BERT pass cheap)")
    q.add_argument("--min-rating", type=float, help="implicit positives: keep ratings >= this")


def _add_preprocess_args(p: argparse.ArgumentParser) -> None:
    add_raw_input_args(p.add_argument_group("input"))

    out = p.add_argument_group("output")
    out.add_argument("--output-dir", required=True, help="the dataset dir to write (local path or gs://)")
    out.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output-dir")

    ex = p.add_argument_group("examples and split")
    ex.add_argument("--split", default="leave_last_n", choices=("leave_last_n", "global_cutoff"),
                    help="temporal split into train / valid / eval (test) (default leave_last_n)")
    ex.add_argument("--leave-last-n", type=int, default=1,
                    help="leave_last_n: test targets per user, and as many validation targets before them (default 1)")
    ex.add_argument("--cutoff", type=int, help="global_cutoff: epoch second where the test period starts")
    ex.add_argument("--cutoff-quantile", type=float, help="global_cutoff: put the test cutoff at this quantile of time")
    ex.add_argument("--valid-cutoff", type=int, help="global_cutoff: epoch second where the validation period starts")
    ex.add_argument("--valid-cutoff-quantile", type=float,
                    help="global_cutoff: put the validation cutoff at this quantile of time (default: a validation "
                         "period with as many events as the test period, 2q-1 for --cutoff-quantile q)")
    ex.add_argument("--repeats", default="exclude", choices=("exclude", "allow"),
                    help="items the user already consumed: exclude (every query is ranked without them; targets "
                         "the user already consumed are reported apart) or allow (nothing removed). Recorded in "
                         "metadata.json for training, evaluation and serving (default exclude, right for "
                         "MovieLens-like data where an item is consumed once)")
    add_query_args(ex)
    ex.add_argument("--max-examples-per-user", type=int, default=0, help="most recent train cut points per user (0: all)")
    ex.add_argument("--min-history", type=int, default=0, help="skip train targets with fewer history items")

    f = p.add_argument_group("filters")
    f.add_argument("--min-user-interactions", type=int, default=1)
    f.add_argument("--min-item-interactions", type=int, default=0)


def parse_formats(entries, allowed) -> tuple:
    """Repeated / comma-separated --format values -> unique names in order; UserError for unknown ones."""
    formats = []
    for entry in entries:
        for name in filter(None, (x.strip() for x in entry.split(","))):
            if name not in allowed:
                raise UserError(f"--format {name!r}: expected one of {tuple(allowed)}")
            if name not in formats:
                formats.append(name)
    return tuple(formats)


def parse_column_map(entries) -> dict:
    """["user_id=uid", "items.title=name"] -> {"user_id": "uid", "items": {"title": "name"}}-style mapping."""
    flat, per_kind = {}, {}
    for entry in entries:
        if "=" not in entry:
            raise UserError(f"--map {entry!r}: expected FIELD=COLUMN or KIND.FIELD=COLUMN")
        key, column = entry.split("=", 1)
        if "." in key:
            kind, field = key.split(".", 1)
            per_kind.setdefault(kind, {})[field] = column
        else:
            flat[key] = column
    if not per_kind:
        return flat
    kinds = ("interactions", "items", "users")
    unknown = set(per_kind) - set(kinds)
    if unknown:
        raise UserError(f"--map names unknown kind(s) {sorted(unknown)}; expected one of {kinds}")
    from beam_pipelines.sources import source_spec

    out = {}
    for kind in kinds:
        required, optional = source_spec.FIELDS[kind]
        m = {k: v for k, v in flat.items() if k in required + optional}
        m.update(per_kind.get(kind, {}))
        out[kind] = m
    return out


def _find(input_dir: str, stem: str, required: bool):
    for ext in (".csv", ".jsonl", ".parquet", ".json", ".csv.gz", ".jsonl.gz"):
        path = os.path.join(input_dir, stem + ext)
        if os.path.exists(path):
            return path
    if required:
        raise UserError(f"{input_dir}: no {stem}.csv/.jsonl/.parquet found (expected the generic input layout)")
    return None


def build_sources(args: argparse.Namespace) -> list:
    from beam_pipelines.sources import download as movielens
    from beam_pipelines.sources import readers

    options = {"min_timestamp": args.min_timestamp, "max_timestamp": args.max_timestamp}
    options = {k: v for k, v in options.items() if v is not None}
    if args.source == "generic":
        interactions, items, users = args.interactions, args.items, args.users
        if args.input_dir:
            interactions = interactions or _find(args.input_dir, "interactions", True)
            items = items or _find(args.input_dir, "items", True)
            users = users or _find(args.input_dir, "users", False)
        if not interactions or not items:
            raise UserError("generic input needs --input-dir DIR, or --interactions FILE and --items FILE")
        return readers.generic_sources(interactions, items, users, format=args.input_format,
                                       columns=parse_column_map(args.map), **options)
    if args.map or args.interactions or args.items or args.users:
        raise UserError(f"--map/--interactions/--items/--users apply to --source generic, not {args.source}")
    if args.download:
        data_dir = movielens.fetch_movielens(args.source, os.path.expanduser(args.cache_dir), local_dir=args.input_dir)
    elif args.input_dir:
        data_dir = args.input_dir
    else:
        raise UserError(f"--source {args.source} needs --input-dir (a local copy) or --download")
    if args.source == "ml-100k":
        return readers.movielens_100k_sources(data_dir, **options)
    return readers.movielens_csv_sources(data_dir, **options)


def preprocess_config(args: argparse.Namespace):
    from beam_pipelines import preprocess
    from trainer.data import examples

    policy_args = dict(split=args.split, leave_last_n=args.leave_last_n, cutoff=args.cutoff,
                       valid_cutoff=args.valid_cutoff, max_examples_per_user=args.max_examples_per_user, min_history=args.min_history)
    if args.max_history is not None:
        policy_args["max_history"] = args.max_history
    if args.text_history is not None:
        policy_args["text_history"] = args.text_history
    return preprocess.PreprocessConfig(
        sources=tuple(build_sources(args)),
        output_dir=args.output_dir,
        source_name=args.source,
        policy=examples.ExamplePolicy(**policy_args),
        cutoff_quantile=args.cutoff_quantile,
        valid_cutoff_quantile=args.valid_cutoff_quantile,
        repeats=args.repeats,
        min_user_interactions=args.min_user_interactions,
        min_item_interactions=args.min_item_interactions,
        min_rating=args.min_rating,
        overwrite=args.overwrite,
    )


@command("preprocess", "Turn raw interaction logs into the dataset dir (Apache Beam).", beam=True)(_add_preprocess_args)
def run_preprocess(args: argparse.Namespace, beam_args) -> int:
    from beam_pipelines import preprocess

    config = preprocess_config(args)
    summary = preprocess.run(config, beam_args)
    print(preprocess.format_summary(summary))
    return 0
