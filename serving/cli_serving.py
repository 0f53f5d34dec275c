"""CLI adapter of the serving commands: `segrec export`."""

from __future__ import annotations

import argparse

from trainer.cli import UserError, command


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="what `segrec train` wrote")
    p.add_argument("--base-path", required=True, help="model base path; writes <base-path>/segrec/<version>/")
    p.add_argument("--version", type=int, help="version number (default: one more than the highest existing)")
    p.add_argument("--index", default="scann", choices=("scann", "brute_force"),
                   help="scann (needs a TF Serving build with ScaNN ops) or brute_force (stock TF Serving)")
    p.add_argument("--k-max", type=int, default=100, help="the largest k a request may ask for (default 100)")
    p.add_argument("--default-k", type=int, default=10, help="k of recommend_defaults / serving_tf_example")
    p.add_argument("--default-beta", type=float, help="beta of recommend_defaults / serving_tf_example "
                   "(default: the run's)")
    p.add_argument("--min-recall", type=float, default=0.95,
                   help="least ScaNN recall@10 against brute force on held-out queries (default 0.95)")
    p.add_argument("--recall-queries", type=int, default=1000, help="held-out queries of the recall check")
    p.add_argument("--segments", help="a refreshed segments.json whose centroids replace the model's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --version")
    p.add_argument("--seed", type=int, default=0)


@command("export", "Export a trained run as a SavedModel version with a ScaNN or brute-force index.")(_add_export_args)
def run_export(args: argparse.Namespace, beam_args) -> int:
    from serving import export

    config = export.ExportConfig(
        run_dir=args.run_dir, base_path=args.base_path, version=args.version, index=args.index,
        k_max=args.k_max, min_recall=args.min_recall, segments_path=args.segments,
        recall_queries=args.recall_queries, overwrite=args.overwrite, default_k=args.default_k,
        default_beta=args.default_beta, seed=args.seed)
    try:
        summary = export.export(config, progress=True)
    except FileExistsError as err:
        raise UserError(str(err)) from err
    print(export.format_summary(summary))
    return 0
