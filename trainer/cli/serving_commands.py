"""CLI adapters of the serving commands: `segrec export`, `segrec serve`, `segrec recommend`."""

from __future__ import annotations

import argparse

from trainer.cli.registry import UserError, command


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
    p.add_argument("--segments-file", help="a refreshed segments.json (`segrec segments refresh`) whose centroids "
                   "replace the model's (same K and embedding dim) and which is copied beside the model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --version")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder-precision", default="float32", choices=("float32", "float16", "int8"),
                   help="weights of the BERT user encoder: float16 (cast to float32 where read) or int8 "
                        "(per-channel weight-only, dequantised in the graph); stock TF ops either way")
    p.add_argument("--min-overlap", type=float, default=0.95,
                   help="least top-10 overlap of a float16/int8 encoder with float32 on held-out queries "
                        "(default 0.95); below it the export fails and nothing is published")
    p.add_argument("--target", default="segrec-serve", choices=("segrec-serve", "tf-serving-stock", "tf-serving-scann"),
                   help="the server the export's non-core ops are checked for (k8s/README.md: which TF Serving "
                        "release carries which)")
    p.add_argument("--text-input", default="text", choices=("text", "token_ids"),
                   help="text: signatures take user_text (tokenised in the graph: tensorflow_text ops); token_ids: "
                        "they take input_ids/padding_mask tokenised by the client (no text ops on the server)")


@command("export", "Export a trained run as a SavedModel version with a ScaNN or brute-force index.")(_add_export_args)
def run_export(args: argparse.Namespace, beam_args) -> int:
    from serving.export import card
    from serving.export import exporter as export

    config = export.ExportConfig(
        run_dir=args.run_dir, base_path=args.base_path, version=args.version, index=args.index,
        k_max=args.k_max, min_recall=args.min_recall, segments_path=args.segments_file,
        recall_queries=args.recall_queries, overwrite=args.overwrite, default_k=args.default_k,
        default_beta=args.default_beta, seed=args.seed, encoder_precision=args.encoder_precision,
        min_overlap=args.min_overlap, target=args.target, text_input=args.text_input)
    try:
        summary = export.export(config, progress=True)
    except FileExistsError as err:
        raise UserError(str(err)) from err
    print(card.format_summary(summary))
    return 0


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-base-path", required=True, help="holds <model-name>/<version>/ (what export wrote)")
    p.add_argument("--model-name", default="segrec")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default localhost only)")
    p.add_argument("--port", type=int, default=8500, help="gRPC port (0 = any free port, printed)")
    p.add_argument("--rest-port", type=int, default=0, help="REST port, TF Serving's JSON API (0 = off)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    p.add_argument("--poll-seconds", type=float, default=2.0, help="how often to look for new versions")
    p.add_argument("--max-batch-size", type=int, default=64, help="rows of one model call and of one request")
    p.add_argument("--batch-timeout-ms", type=float, default=5.0,
                   help="with --batch-threads > 1: how long a queued request waits for others while the model is "
                        "busy (a request that finds the model idle runs at once)")
    p.add_argument("--batch-threads", type=int, default=1,
                   help="model calls that may run at the same time (TF Serving's num_batch_threads)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before RESOURCE_EXHAUSTED")
    p.add_argument("--version-labels", default="", help="e.g. stable=1,canary=2")
    p.add_argument("--max-string-mb", type=float, default=10.0, help="largest string element of a request")
    p.add_argument("--token-env", help="name of an environment variable holding a bearer token to require")
    p.add_argument("--tls-cert", help="PEM certificate (with --tls-key: serve gRPC over TLS)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--fault-delay-ms", type=float, default=0.0,
                   help="fault drill: add this much latency inside every model call (tests, drills; never in "
                        "production)")
    p.add_argument("--text-cache-size", type=int, default=100_000,
                   help="user texts whose encoder vectors each loaded version keeps (LRU), so a repeated "
                        "user_text skips the encoder; 0 = off (default 100000; text exports only)")


@command("serve", "Serve exported versions over TF Serving's gRPC API (development server).")(_add_serve_args)
def run_serve(args: argparse.Namespace, beam_args) -> int:
    import os

    from serving.server import memory

    # Before TensorFlow is imported: oneDNN's weight caches outlive a swapped-out version (memory.py).
    os.environ.setdefault(memory.ONEDNN_ENV, "0")
    from serving.server import app as server
    from serving.server import config as serve_config

    if not os.path.isdir(args.model_base_path):
        raise UserError(f"--model-base-path {args.model_base_path} is not a directory")
    if args.fault_delay_ms < 0 or args.batch_timeout_ms < 0:
        raise UserError("--fault-delay-ms and --batch-timeout-ms must be >= 0")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    if args.text_cache_size < 0:
        raise UserError("--text-cache-size must be >= 0 (0 = no cache)")
    for flag in ("max_batch_size", "max_queue", "batch_threads"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise UserError(f"--token-env {args.token_env}: the variable is not set")
    config = serve_config.ServeConfig(
        model_base_path=args.model_base_path, model_name=args.model_name, host=args.host, port=args.port,
        poll_seconds=args.poll_seconds, max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms,
        max_queue=args.max_queue, rest_port=args.rest_port, metrics_port=args.metrics_port,
        version_labels=serve_config.parse_labels(args.version_labels),
        max_string_bytes=int(args.max_string_mb * 1024 * 1024), token=token,
        tls_cert=args.tls_cert, tls_key=args.tls_key, batch_threads=args.batch_threads,
        fault_delay_ms=args.fault_delay_ms, text_cache_size=args.text_cache_size)
    return server.serve(config)


def _add_recommend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="localhost:8500", help="host:port of segrec serve or TF Serving")
    p.add_argument("--user-text", required=True)
    p.add_argument("--history", default="", help="comma-separated item ids, most recent first")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--beta", type=float, help="segment pull (default: the model's)")
    p.add_argument("--version-label", help="e.g. stable or canary")
    p.add_argument("--model-name", default="segrec")
    p.add_argument("--segments-file", help="segments.json for segment labels (default: asked of the server)")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline of each attempt, seconds")
    p.add_argument("--token-env", help="name of an environment variable holding the bearer token")
    p.add_argument("--tls-ca", help="PEM root certificate: connect over TLS")
    p.add_argument("--token-ids-export", metavar="VERSION_DIR",
                   help="the model is a token-id export (--text-input token_ids): tokenise --user-text with the "
                        "vocabulary of this local copy of its version dir")


@command("recommend", "Ask a running server for one user's recommendations and print them.")(_add_recommend_args)
def run_recommend(args: argparse.Namespace, beam_args) -> int:
    import os

    from serving import client as cl

    token = os.environ.get(args.token_env) if args.token_env else None
    root = open(args.tls_ca, "rb").read() if args.tls_ca else None
    history = [h.strip() for h in args.history.split(",") if h.strip()]
    tokens = None
    if args.token_ids_export:
        from trainer.model.token_ids import TokenIds

        tokens = TokenIds.from_export(args.token_ids_export)
    with cl.RecommenderClient(args.target, timeout=args.timeout, model_name=args.model_name, token=token,
                              root_certificates=root, tls=root is not None,
                              segments_path=args.segments_file, token_ids=tokens) as client:
        try:
            rec = client.recommend(args.user_text, history, k=args.k, beta=args.beta,
                                   version_label=args.version_label)
        except cl.RecommendError as err:
            raise UserError(str(err)) from err
    print(cl.format_recommendation(rec))
    return 0
