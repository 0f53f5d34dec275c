"""CLI adapter of `segrec demo` (the README's main-job command)."""

from __future__ import annotations

import argparse

from trainer.cli.registry import UserError, command


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="out/demo", help="where every artefact of the run goes (default: out/demo)")
    p.add_argument("--data", default="generated", choices=("generated", "ml-100k"),
                   help="the embedded synthetic data (default) or MovieLens 100K from --data-dir")
    p.add_argument("--data-dir", help="--data ml-100k: a local copy of the MovieLens 100K files")
    p.add_argument("--size", default="small", help="generated data size preset (default: small)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--encoder", default="minilm", help="minilm (pretrained, default) or tiny (fast, for a quick look)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--index", default="scann", choices=("scann", "brute_force"),
                   help="the exported item index (default scann; brute_force runs on stock TF Serving)")


@command("demo", "Run the main job end to end: generate -> preprocess -> ... on the embedded data.", beam=True)(_add_demo_args)
def run_demo(args: argparse.Namespace, beam_args) -> int:
    from trainer.cli import demo

    config = demo.DemoConfig(output_dir=args.output_dir, data=args.data, data_dir=args.data_dir,
                             size=args.size, seed=args.seed, encoder=args.encoder, epochs=args.epochs, index=args.index,
                             beam_args=tuple(beam_args))
    try:
        demo.run(config)
    except demo.StageError as err:
        raise UserError(str(err)) from err
    return 0
