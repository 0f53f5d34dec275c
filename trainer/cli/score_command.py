"""CLI adapter of `segrec score` (batch scoring with Beam RunInference)."""

from __future__ import annotations

import argparse

from trainer.cli import data_commands as cli_data
from trainer.cli.registry import UserError, command

DAY = 86400


def _add_score_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("input: a dataset dir, or raw input as `segrec preprocess` reads it")
    src.add_argument("--dataset-dir", help="a dataset dir written by `segrec preprocess`: scores each user's newest "
                     "query in it (eval split, else train)")
    cli_data.add_raw_input_args(src)

    q = p.add_argument_group("queries from raw input (as preprocess builds them; max history and text history "
                             "default to the model's training data's)")
    cli_data.add_query_args(q)
    q.add_argument("--as-of", type=int, help="epoch second to score as of: later events are ignored "
                   "(default: after the last event)")
    q.add_argument("--window-days", type=float, help="only events in the last N days before --as-of count")
    q.add_argument("--cold-users", action="store_true",
                   help="score users with a profile but no usable events as cold users (default: dead-letter them)")

    m = p.add_argument_group("model")
    m.add_argument("--model-dir", required=True,
                   help="an export version dir <base>/segrec/<version>, or a model base path (its latest version)")
    m.add_argument("--k", type=int, help="items per user (default: the export's default k)")
    m.add_argument("--beta", type=float, help="segment pull of the query (default: the export's default beta)")
    m.add_argument("--min-batch-size", type=int, help="RunInference's smallest batch (default: Beam's, 1)")
    m.add_argument("--max-batch-size", type=int, default=256, help="RunInference's largest batch (default 256)")
    m.add_argument("--text-cache-size", type=int, default=100_000,
                   help="distinct user texts whose encoder vectors a worker keeps, so each is encoded once "
                        "(default 100000; 0: encode every row)")

    out = p.add_argument_group("output")
    out.add_argument("--output-dir", required=True, help="where the results go (local path or gs://)")
    out.add_argument("--format", action="append", metavar="jsonl|parquet",
                     help="file format of the records; repeat or comma-separate for both (default: jsonl)")
    out.add_argument("--bigquery-table", metavar="PROJECT:DATASET.TABLE",
                     help="also write the records to BigQuery (needs `pip install 'segrec[gcp]'`)")
    out.add_argument("--overwrite", action="store_true", help="replace results already in --output-dir "
                     "(and truncate --bigquery-table)")


def _formats(args: argparse.Namespace) -> tuple:
    from beam_pipelines import score_records

    if not args.format:
        return () if args.bigquery_table else (score_records.JSONL,)
    return cli_data.parse_formats(args.format, score_records.FORMATS)


def _has_raw_input(args: argparse.Namespace) -> bool:
    return bool(args.input_dir or args.interactions or args.items or args.users or args.download
                or args.source != "generic")


def score_config(args: argparse.Namespace):
    from beam_pipelines import score
    from trainer.data import examples

    raw = _has_raw_input(args)
    if raw and args.dataset_dir:
        raise UserError("give --dataset-dir or raw input (--input-dir, --interactions/--items, --source), not both")
    if not raw and not args.dataset_dir:
        raise UserError("nothing to score: give --dataset-dir DIR, or raw input (--input-dir DIR, "
                        "or --interactions FILE --items FILE)")
    sources, policy = (), None  # None: the model's training policy (score.training_policy)
    if raw:
        sources = tuple(cli_data.build_sources(args))
        if args.max_history is not None or args.text_history is not None:
            base = examples.ExamplePolicy()
            policy = examples.ExamplePolicy(
                max_history=base.max_history if args.max_history is None else args.max_history,
                text_history=base.text_history if args.text_history is None else args.text_history)
    elif any(v is not None for v in (args.window_days, args.as_of, args.min_rating, args.max_history,
                                     args.text_history)) or args.cold_users:
        raise UserError("--as-of/--window-days/--cold-users/--min-rating/--max-history/--text-history apply to "
                        "raw input, not --dataset-dir")
    if args.window_days is not None and args.window_days <= 0:
        raise UserError(f"--window-days must be > 0, got {args.window_days}")
    if args.text_cache_size < 0:
        raise UserError(f"--text-cache-size must be >= 0, got {args.text_cache_size}")
    return score.ScoreConfig(
        text_cache_size=args.text_cache_size,
        model_dir=args.model_dir,
        output_dir=args.output_dir,
        dataset_dir=args.dataset_dir,
        sources=sources,
        source_name=args.source,
        policy=policy,
        min_rating=args.min_rating,
        as_of=args.as_of,
        window_seconds=None if args.window_days is None else int(round(args.window_days * DAY)),
        cold_users=args.cold_users,
        k=args.k,
        beta=args.beta,
        min_batch_size=args.min_batch_size,
        max_batch_size=args.max_batch_size,
        formats=_formats(args),
        bigquery_table=args.bigquery_table,
        overwrite=args.overwrite,
    )


@command("score", "Score users in batch with the exported model: top-k items and segment per user "
         "(Apache Beam RunInference).", beam=True)(_add_score_args)
def run_score(args: argparse.Namespace, beam_args) -> int:
    from beam_pipelines import score

    config = score_config(args)
    summary = score.run(config, beam_args)
    print(score.format_summary(summary))
    return 0
