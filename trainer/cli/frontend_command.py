"""CLI adapter of `segrec frontend`: the reference recommender page."""

from __future__ import annotations

import argparse

from trainer.cli.registry import UserError, command


def _add_frontend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="localhost:8500", help="host:port of segrec serve or TF Serving")
    p.add_argument("--host", default="127.0.0.1", help="bind address of the page (default localhost only)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port of the page (default 8080)")
    p.add_argument("--dataset-dir", help="what `segrec preprocess` wrote: existing users and item titles "
                   "(without it: typed profiles and raw item ids only)")
    p.add_argument("--max-users", type=int, default=300, help="existing users listed (default 300)")
    p.add_argument("--segments-file", help="segments.json for segment labels and profiles")
    p.add_argument("--model-base-path", help="else the segment profiles of the served version: "
                   "<model-base-path>/<model-name>/<version>/segments.json")
    p.add_argument("--model-name", default="segrec")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline of each gRPC attempt, seconds")
    p.add_argument("--token-env", help="name of an environment variable holding the bearer token")
    p.add_argument("--tls-ca", help="PEM root certificate: connect over TLS")


@command("frontend", "Serve the reference recommender web page, a client of segrec serve / TF Serving.")(
    _add_frontend_args)
def run_frontend(args: argparse.Namespace, beam_args) -> int:
    import os

    from serving.frontend import web as frontend

    if args.dataset_dir and not os.path.isdir(args.dataset_dir):
        raise UserError(f"--dataset-dir {args.dataset_dir} is not a directory")
    if args.segments_file and not os.path.isfile(args.segments_file):
        raise UserError(f"--segments-file {args.segments_file} is not a file")
    if args.model_base_path and not os.path.isdir(args.model_base_path):
        raise UserError(f"--model-base-path {args.model_base_path} is not a directory")
    if args.max_users < 1:
        raise UserError("--max-users must be >= 1")
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise UserError(f"--token-env {args.token_env}: the variable is not set")
    root = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            root = f.read()
    config = frontend.FrontendConfig(
        target=args.target, host=args.host, port=args.port, dataset_dir=args.dataset_dir,
        segments_path=args.segments_file, model_base_path=args.model_base_path, model_name=args.model_name,
        timeout=args.timeout, tls=root is not None, root_certificates=root, token=token, max_users=args.max_users)
    return frontend.run(config)
