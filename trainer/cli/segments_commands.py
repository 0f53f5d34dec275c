"""CLI adapter of `segrec segments refresh` and `segrec segments report`.

The command registry takes one name per command, so `segments` is one
command whose first argument picks the action (an argparse subparser).
Unknown flags go to Beam as PipelineOptions (only `refresh` runs Beam).

Exit status of `refresh` (beam_pipelines.refresh.EXIT_CODES): 0 no drift;
3 (EXIT_DRIFT) a drift figure resting on enough users passes its threshold
and retraining is advised; 4 (EXIT_INSUFFICIENT_DATA) too few users to judge
(a window under --min-window-users, or a check that could not be judged and
none over its threshold); 2 bad input.
"""

from __future__ import annotations

import argparse

from trainer.cli import data_commands as cli_data
from trainer.cli.registry import UserError, command

DAY = 86400


def _add_refresh_args(p: argparse.ArgumentParser) -> None:
    from trainer.segments import drift as sd

    src = p.add_argument_group("input: raw interactions, as `segrec preprocess` reads them")
    cli_data.add_raw_input_args(src)
    q = p.add_argument_group("queries (as preprocess builds them; use the training dataset's values)")
    cli_data.add_query_args(q)

    w = p.add_argument_group("windows")
    w.add_argument("--as-of", type=int, help="epoch second ending the current window (default: just after the last event)")
    w.add_argument("--window-days", type=float, default=30.0,
                   help="window length; current [as_of - w, as_of), previous [as_of - 2w, as_of - w) (default 30)")

    m = p.add_argument_group("model and segments")
    m.add_argument("--model-dir", required=True,
                   help="an export version dir <base>/segrec/<version>, or a model base path (its latest version)")
    m.add_argument("--previous", help="the current segments.json: its centroids are the starting point "
                   "(default: the one beside the model)")
    m.add_argument("--previous-assignments", help="the last refresh's assignments-*.jsonl (glob allowed): old "
                   "segments per user; without it the previous window is embedded to get them")
    mins = sd.DriftMinimums()
    m.add_argument("--min-segment-users", type=int, default=mins.segment_users,
                   help="segments with fewer users are not profiled, and their centroid shift is not judged; a "
                   "segment is new/vanished only when it crosses this size and the other "
                   f"window is large enough to tell (default {mins.segment_users})")
    m.add_argument("--min-batch-size", type=int, help="RunInference's smallest batch (default: Beam's)")
    m.add_argument("--max-batch-size", type=int, default=256, help="RunInference's largest batch (default 256)")

    e = p.add_argument_group("evidence: below these minimums the verdict is 'insufficient data' (exit status 4)")
    e.add_argument("--min-window-users", type=int, default=mins.window_users,
                   help="users each window needs (previous and current) for any verdict; with K segments, sampling "
                   f"alone gives a PSI of about (K-1)(1/n_old + 1/n_new) (default {mins.window_users})")
    e.add_argument("--min-compared-users", type=int, default=mins.compared_users,
                   help="users present in both windows the moved share needs to count "
                   f"(default {mins.compared_users})")

    d = sd.DriftThresholds()
    t = p.add_argument_group("drift thresholds (any one, judged on enough users, advises retraining: exit status 3)")
    t.add_argument("--psi-threshold", type=float, default=d.psi,
                   help=f"total PSI above this; PSI of counts + {sd.PSI_ALPHA:g} per segment (default {d.psi})")
    t.add_argument("--moved-threshold", type=float, default=d.moved_share,
                   help=f"share of users in both windows that changed segment (default {d.moved_share})")
    t.add_argument("--shift-threshold", type=float, default=d.centroid_shift,
                   help=f"largest centroid cosine distance (default {d.centroid_shift})")
    t.add_argument("--ignore-new-vanished", action="store_true",
                   help="do not count segments crossing --min-segment-users as drift")

    k = sd.KMeansSettings()
    km = p.add_argument_group("mini-batch k-means")
    km.add_argument("--kmeans-iterations", type=int, default=k.iterations, help=f"mini-batches (default {k.iterations})")
    km.add_argument("--batch-fraction", type=float, default=k.batch_fraction,
                    help=f"share of the window's users per mini-batch, seeded hash sample (default {k.batch_fraction})")
    km.add_argument("--prior-weight", type=float, default=k.prior_weight,
                    help="weight of the old centroids, in units of the previous window's segment sizes "
                    f"(default {k.prior_weight})")
    km.add_argument("--seed", type=int, default=k.seed)

    out = p.add_argument_group("output")
    out.add_argument("--output-dir", required=True, help="segments-v<N>.json, segments.json and v<N>/ go here")
    out.add_argument("--format", action="append", metavar="jsonl|parquet",
                     help="assignments file format; repeat or comma-separate for both (default: jsonl)")
    out.add_argument("--embedding-sample", type=int, default=5000,
                     help="users whose embeddings are kept in embeddings.npz for reports (default 5000)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing v<N>/ of the same version")


def _add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--segments-file", required=True, help="the segments.json to report on")
    p.add_argument("--previous", help="the previous segments.json: what changed since")
    p.add_argument("--embeddings", help="user embeddings: a refresh's v<N>/ dir or embeddings.npz, any .npz with "
                   "user_ids + embeddings, or a `segrec train` run dir (its user snapshot)")
    p.add_argument("--compare-methods", action="store_true",
                   help="also cluster the embeddings with Ward and DBSCAN; silhouette and ARI in a table")
    p.add_argument("--min-segment-users", type=int, default=20, help="smaller segments are hidden (default 20)")
    p.add_argument("--projection", default="pca", choices=("pca", "tsne"), help="2-D projection of the embeddings")
    p.add_argument("--title", default="segrec segments")
    p.add_argument("--output-dir", required=True)


def _add_segments_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="segments_action", metavar="ACTION")
    sub.required = True
    _add_refresh_args(sub.add_parser(
        "refresh", help="new centroids over a recent window, migration and drift report (Apache Beam)",
        description="Recompute user embeddings over a recent window with the exported model, update the centroids "
        "by mini-batch k-means from the current ones, reassign users, write a new versioned segments.json and a "
        "drift report. Exit status: 0 no drift, 3 retraining advised, 4 insufficient data (too few users to judge; "
        "see --min-window-users, --min-compared-users, --min-segment-users), 2 bad input. Unknown flags go to Beam "
        "as PipelineOptions."))
    _add_report_args(sub.add_parser(
        "report", help="markdown + HTML report of a segments.json (sizes, profiles, changes, method comparison)"))


def refresh_config(args: argparse.Namespace):
    from beam_pipelines import refresh
    from trainer.data import examples
    from trainer.segments import drift as sd

    sources = tuple(cli_data.build_sources(args))
    policy_args = {name: getattr(args, name) for name in ("max_history", "text_history") if getattr(args, name) is not None}
    return refresh.RefreshConfig(
        model_dir=args.model_dir,
        sources=sources,
        output_dir=args.output_dir,
        as_of=args.as_of,
        window_days=args.window_days,
        previous=args.previous,
        previous_assignments=args.previous_assignments,
        min_segment_users=args.min_segment_users,
        min_window_users=args.min_window_users,
        min_compared_users=args.min_compared_users,
        thresholds=sd.DriftThresholds(psi=args.psi_threshold, moved_share=args.moved_threshold,
                                      centroid_shift=args.shift_threshold, new_or_vanished=not args.ignore_new_vanished),
        kmeans=sd.KMeansSettings(iterations=args.kmeans_iterations, batch_fraction=args.batch_fraction,
                                 prior_weight=args.prior_weight, seed=args.seed),
        policy=examples.ExamplePolicy(**policy_args),
        min_rating=args.min_rating,
        min_batch_size=args.min_batch_size,
        max_batch_size=args.max_batch_size,
        formats=cli_data.parse_formats(args.format or ["jsonl"], ("jsonl", "parquet")),
        embedding_sample=args.embedding_sample,
        overwrite=args.overwrite,
    )


@command("segments", "Segment refresh (drift, migration; Apache Beam) and segment reports.", beam=True)(_add_segments_args)
def run_segments(args: argparse.Namespace, beam_args) -> int:
    if args.segments_action == "refresh":
        from beam_pipelines import refresh

        summary = refresh.run(refresh_config(args), beam_args)
        print(refresh.format_summary(summary))
        return summary.exit_code
    if beam_args:
        raise UserError(f"unrecognized arguments for segments report: {' '.join(beam_args)}")
    from trainer.segments import segment_report as segments_report

    paths = segments_report.write_report(
        args.segments_file, args.output_dir, previous_path=args.previous, embeddings=args.embeddings,
        compare_methods=args.compare_methods, min_segment_users=args.min_segment_users,
        projection=args.projection, title=args.title)
    print(f"segments report -> {args.output_dir}")
    for name, path in paths.items():
        print(f"  {name:<20} {path}")
    return 0
