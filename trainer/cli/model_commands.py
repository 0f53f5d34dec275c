"""CLI adapters of the model commands: `segrec train` and `segrec evaluate`."""

from __future__ import annotations

import argparse
import os

from trainer.cli.registry import UserError, command


def _segments(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 or 'auto', got {value!r}") from None


def _range(value: str) -> tuple:
    try:
        lo, hi = (int(v) for v in value.split("-", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI, e.g. 2-12, got {value!r}") from None
    return lo, hi


def _floats(value: str) -> tuple:
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0,0.5,1, got {value!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one number")
    return out


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-dir", required=True, help="what `segrec preprocess` wrote (local or gs://)")
    p.add_argument("--output-dir", required=True,
                   help="the run dir (local or gs://); on Vertex AI, AIP_MODEL_DIR takes precedence. "
                        "Re-running with the same dir resumes an interrupted run")
    e = p.add_argument_group("encoder")
    e.add_argument("--encoder", default="minilm",
                   help="minilm (pretrained MiniLM-L6 from the installed package, default), tiny (random-init "
                        "BERT with a WordPiece vocabulary from the training text), a keras-hub BERT preset, or a "
                        "local preset directory")
    e.add_argument("--sequence-length", type=int, default=128)
    e.add_argument("--finetune-layers", type=int, default=0,
                   help="fine-tune the top N transformer layers (GPU); 0 keeps the encoder frozen and caches its outputs")
    e.add_argument("--text-cache", help="reuse a text_cache.npz built by an earlier run on the same data")
    m = p.add_argument_group("model")
    m.add_argument("--embedding-dim", type=int, default=64)
    m.add_argument("--num-segments", type=_segments, default=8, help="number of segments K, or 'auto' (silhouette sweep)")
    m.add_argument("--num-segments-range", type=_range, default=(2, 12), help="K range of the auto sweep (default 2-12)")
    m.add_argument("--alpha", type=float, default=0.1, help="clustering loss weight")
    m.add_argument("--beta", type=float, default=None,
                   help="segment pull of the query: q = normalise(u + beta*c). Default: chosen after training, "
                        "on the validation split, from --beta-grid (and recorded as the run's beta)")
    m.add_argument("--beta-grid", type=_floats, default=(0.0, 0.25, 0.5, 0.75, 1.0),
                   help="betas tried on the validation split when --beta is not given (default 0,0.25,0.5,0.75,1)")
    m.add_argument("--segment-temperature", type=float, default=0.1)
    m.add_argument("--retrieval-temperature", type=float, default=0.05)
    m.add_argument("--user-id-buckets", type=int, default=0, help="hashed user-id embedding buckets (0: off)")
    m.add_argument("--history-encoder", choices=("transformer", "mean"), default="transformer",
                   help="how the user tower reads the history: a causal transformer (default) or a mean")
    m.add_argument("--history-layers", type=int, default=2, help="transformer blocks (default 2)")
    m.add_argument("--history-heads", type=int, default=2, help="attention heads (default 2)")
    m.add_argument("--history-dropout", type=float, default=0.2, help="transformer dropout (default 0.2)")
    m.add_argument("--empty-history-rate", type=float, default=0.0,
                   help="share of training examples whose query reads no history, so brand-new users (text "
                        "only) are served from what training saw (default 0)")
    m.add_argument("--loss", choices=("auto", "full", "sampled", "in_batch"), default="auto",
                   help="retrieval loss: full-catalog softmax, a mixed pool (in-batch + 1024 uniform negatives, "
                   "logQ-corrected), in-batch softmax with logQ, or auto (full up to 50,000 items, sampled beyond)")
    m.add_argument("--item-prior", choices=("global", "segment", "none"), default="global",
                   help="learned item bias added to the score: global (default), per segment (the user's segment "
                        "lifts what it favours), or none")
    m.add_argument("--positions", choices=("auto", "all", "last"), default="auto",
                   help="transformer + full softmax: train every history slot on its next item (all), or only the "
                   "target (last); auto: last when every cut point is an example already (preprocess "
                   "--max-examples-per-user 0) or user_text folds in recent titles (--text-history > 0), else all")
    m.add_argument("--no-text", dest="use_text", action="store_false",
                   help="the user tower ignores user_text (an ablation: what the text adds)")
    m.add_argument("--cold-query", choices=("user", "centroid"), default="user",
                   help="users with no history: served from their own (text) vector (default) or their centroid")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--warmup-epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--learning-rate", type=float, default=3e-3)
    t.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine decay of --learning-rate to 0 over every warm-up and joint-training step of "
                        "--epochs (default), or constant")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay (0: Adam)")
    t.add_argument("--patience", type=int, default=3,
                   help="early-stopping patience on the validation metric (0: off); the best validation epoch is kept")
    select = t.add_mutually_exclusive_group()
    select.add_argument("--select-metric", default=None, metavar="recall@K|ndcg@10",
                        help="the validation metric that picks the epoch, beta and (in evaluate) every baseline's "
                             "hyper-parameters (default recall@50)")
    select.add_argument("--recall-k", type=int, default=None, metavar="K",
                        help="shorthand for --select-metric recall@K")
    t.add_argument("--steps-per-epoch", type=int)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--mixed-precision", choices=("auto", "on", "off"), default="auto")
    t.add_argument("--quiet", action="store_true", help="no per-epoch progress bar")


def train_config(args: argparse.Namespace):
    from trainer.training.job import TrainConfig

    return TrainConfig(
        dataset_dir=args.dataset_dir, output_dir=args.output_dir, encoder=args.encoder,
        sequence_length=args.sequence_length, finetune_layers=args.finetune_layers, embedding_dim=args.embedding_dim,
        segments=args.num_segments, segments_range=tuple(args.num_segments_range), alpha=args.alpha, beta=args.beta,
        beta_grid=tuple(args.beta_grid),
        segment_temperature=args.segment_temperature, retrieval_temperature=args.retrieval_temperature,
        user_id_buckets=args.user_id_buckets, history_encoder=args.history_encoder,
        history_layers=args.history_layers, history_heads=args.history_heads, history_dropout=args.history_dropout,
        empty_history_rate=args.empty_history_rate,
        loss=args.loss, item_prior=args.item_prior, cold_query=args.cold_query, positions=args.positions, use_text=args.use_text, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay, patience=args.patience,
        select_metric=args.select_metric or f"recall@{args.recall_k or 50}", seed=args.seed,
        mixed_precision={"auto": None, "on": True, "off": False}[args.mixed_precision],
        text_cache=args.text_cache, steps_per_epoch=args.steps_per_epoch, verbose=0 if args.quiet else 1,
    )


@command("train", "Train the two-tower model with its segment head; writes a run dir.")(_add_train_args)
def run_train(args: argparse.Namespace, beam_args) -> int:
    from trainer.training import job as train

    config = train_config(args)
    if not os.path.isdir(config.dataset_dir) and "://" not in config.dataset_dir:
        raise UserError(f"--dataset-dir {config.dataset_dir} does not exist; run `segrec preprocess` first")
    summary = train.train(config, env=os.environ)
    print(train.format_summary(summary, config))
    return 0


def _add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="what `segrec train` wrote")
    p.add_argument("--dataset-dir", help="default: the dataset the run was trained on")
    p.add_argument("--output-dir", help="default: <run-dir>/evaluation")
    p.add_argument("--beta", type=float, help="segment pull of the query (default: the run's, chosen on validation)")
    p.add_argument("--baselines", default="popularity,ease,id_two_tower,sasrec",
                   help="comma-separated: popularity, ease, id_two_tower, sasrec (empty: none); each is fitted on "
                        "every training interaction, tuned on the validation split, refitted on train + valid")
    p.add_argument("--id-two-tower-epochs", type=int, default=None,
                   help="force the ID two-tower's epochs (default: chosen on the validation split from 1,2,3,5,10)")
    p.add_argument("--ease-l2", type=float, default=None,
                   help="force EASE's l2 (default: chosen on the validation split from 10,50,100,200,500,1000,2000)")
    p.add_argument("--sasrec-max-epochs", type=int, default=None,
                   help="cap SASRec's epochs (default 200; the epoch is chosen on the validation split)")
    p.add_argument("--truth", help="ground-truth segments CSV (user_id,segment); default: the generator's, if found")
    p.add_argument("--compare-run", help="a second run (another seed) for segment stability (ARI)")
    p.add_argument("--seed", type=int, default=0)


@command("evaluate", "Full-catalog evaluation of a run against popularity, EASE, an ID-only two-tower and SASRec: "
                     "everything tuned chosen on validation, test scored once.")(_add_evaluate_args)
def run_evaluate(args: argparse.Namespace, beam_args) -> int:
    from trainer.evaluation import evaluate

    baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    params = tuple((name, p) for name, p in (("id_two_tower", {"epochs": args.id_two_tower_epochs}),
                                             ("ease", {"l2": args.ease_l2}),
                                             ("sasrec", {"max_epochs": args.sasrec_max_epochs}))
                   if None not in p.values())
    config = evaluate.EvaluateConfig(
        run_dir=args.run_dir, dataset_dir=args.dataset_dir, output_dir=args.output_dir, beta=args.beta,
        baselines=baselines, baseline_params=tuple(p for p in params if p[0] in baselines),
        truth_path=args.truth, compare_run_dir=args.compare_run, seed=args.seed)
    results = evaluate.evaluate(config)
    print(evaluate.format_summary(results))
    return 0
