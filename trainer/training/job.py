"""`segrec train`: dataset dir -> run dir (see trainer/model/run_dir.py).

Everything training tunes is chosen on the validation split; the test split
(eval-*) is never opened. Phases, each resumable after an interruption:
  1. encoder: build the text encoder; with a frozen encoder, encode every
     distinct user_text of the train and valid splits once into
     text_cache.npz (reused on resume);
  2. warm-up: `warmup_epochs` of retrieval loss only, so user embeddings mean
     something before they are clustered (checkpoints/warmup.weights.h5);
  3. segments: `--num-segments auto` picks K by a silhouette sweep over the
     validation queries' user embeddings (recorded in segment_sweep.json),
     then centroids := k-means of user embeddings;
  4. joint training: retrieval + alpha * clustering loss, the selection
     metric (--select-metric: Recall@K or NDCG@10) on the validation split each epoch (the dataset's repeat rule, the ranking
     `segrec evaluate` uses), early stopping, best weights kept; Keras'
     BackupAndRestore resumes mid-phase from checkpoints/main/;
  5. beta: unless --beta forces one, the beta of the best validation metric
     over `beta_grid` becomes the run's beta (train_config.json, the export's
     default);
  6. artefacts: model weights, metrics.json (with "selection": what was
     chosen on which split), segments.json, model card.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from typing import Mapping, Optional, Union

import keras
import numpy as np
import tensorflow as tf

import trainer  # noqa: F401
from trainer import features
from trainer.data import arrays as da
from trainer.data import examples as ex
from trainer.data import tf_dataset as data_lib
from trainer.model import run_dir as rd
from trainer.model.batched_outputs import user_snapshot
from trainer.model.segrec_model import SegRecModel
from trainer.model.text_encoder import TextCache, TextEncoder
from trainer.segments import document as segments_document
from trainer.segments import profiles as segment_profiles
from trainer.training import distribution
from trainer.training import fit as training

_LOG = logging.getLogger("segrec.train")

FULL_SOFTMAX_MAX_ITEMS = 50_000  # loss "auto": a full catalog softmax up to this many items, a mixed pool beyond
MONITOR_BETA = 0.0  # the beta of train-time recall (early stopping) when --beta does not force one: no pull
BETA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one `segrec train` run (built by the CLI adapter)."""

    dataset_dir: str
    output_dir: str
    encoder: str = "minilm"  # minilm | tiny | a keras-hub BERT preset name | a local preset dir
    sequence_length: int = 128
    finetune_layers: int = 0
    embedding_dim: int = 64
    segments: Union[int, str] = 8  # K, or "auto"
    segments_range: tuple = (2, 12)
    alpha: float = 0.1
    beta: Optional[float] = None  # None: chosen on validation from beta_grid
    beta_grid: tuple = BETA_GRID
    segment_temperature: float = 0.1
    retrieval_temperature: float = 0.05
    user_id_buckets: int = 0
    history_encoder: str = "transformer"  # transformer | mean
    history_layers: int = 2
    history_heads: int = 2
    history_dropout: float = 0.2
    empty_history_rate: float = 0.0
    loss: str = "auto"  # auto (full up to FULL_SOFTMAX_MAX_ITEMS items, sampled beyond) | full | sampled | in_batch
    item_prior: str = "global"  # global | segment | none (global: validation-chosen on ML-100K, see README)
    cold_query: str = "user"  # user | centroid
    positions: str = "auto"  # auto | all | last (see positions_for)
    use_text: bool = True  # False: the user tower ignores user_text (ablation)
    epochs: int = 10
    warmup_epochs: int = 1
    batch_size: int = 256
    learning_rate: float = 3e-3
    lr_schedule: str = "cosine"  # cosine (decays to 0 over warm-up + epochs) | constant
    weight_decay: float = 0.0  # > 0: AdamW's decoupled weight decay
    patience: int = 3
    select_metric: str = "recall@50"  # recall@K | ndcg@10: picks the epoch, beta and evaluate's baselines' settings
    seed: int = 42
    mixed_precision: Optional[bool] = None  # None: on when a GPU is present
    text_cache: Optional[str] = None  # reuse a cache file built by an earlier run
    steps_per_epoch: Optional[int] = None
    verbose: int = 1

    def __post_init__(self):
        if not (isinstance(self.segments, int) and self.segments >= 2) and self.segments != "auto":
            raise ValueError(f"--num-segments must be an integer >= 2 or 'auto', got {self.segments!r}")
        lo, hi = self.segments_range
        if not 2 <= lo <= hi:
            raise ValueError(f"--segments-range must satisfy 2 <= lo <= hi, got {self.segments_range}")
        for name in ("epochs", "batch_size", "embedding_dim", "sequence_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        training.parse_selection_metric(self.select_metric)
        if self.warmup_epochs < 0 or self.finetune_layers < 0 or self.patience < 0:
            raise ValueError("--warmup-epochs, --finetune-layers and --patience must be >= 0")
        if self.segments == "auto" and self.warmup_epochs < 1:
            raise ValueError("--num-segments auto needs --warmup-epochs >= 1 (it clusters warmed-up embeddings)")
        if self.beta is not None and self.beta < 0:
            raise ValueError(f"--beta must be >= 0, got {self.beta}")
        for name, value, allowed in (("history_encoder", self.history_encoder, ("transformer", "mean")),
                                     ("loss", self.loss, ("auto", "full", "sampled", "in_batch")),
                                     ("item_prior", self.item_prior, ("segment", "global", "none")),
                                     ("cold_query", self.cold_query, ("user", "centroid")),
                                     ("positions", self.positions, ("auto", "all", "last")),
                                     ("lr_schedule", self.lr_schedule, ("constant", "cosine"))):
            if value not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {allowed}, got {value!r}")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError(f"--learning-rate must be > 0 and --weight-decay >= 0, got {self.learning_rate}, "
                             f"{self.weight_decay}")
        if self.history_layers < 1 or self.history_heads < 1 or not 0 <= self.history_dropout < 1:
            raise ValueError("--history-layers and --history-heads must be >= 1, --history-dropout in [0, 1)")
        if not 0 <= self.empty_history_rate < 1:
            raise ValueError(f"--empty-history-rate must be in [0, 1), got {self.empty_history_rate}")
        if not self.beta_grid or any(b < 0 for b in self.beta_grid):
            raise ValueError(f"--beta-grid must hold one or more betas >= 0, got {self.beta_grid}")

    def loss_for(self, num_items: int) -> str:
        """The retrieval loss this run uses on a catalog of `num_items`."""
        if self.loss != "auto":
            return self.loss
        return "full" if num_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled"

    def positions_for(self, text_history: int, max_examples_per_user: int) -> str:
        """The trained positions on a dataset whose user_text folds in `text_history` recent titles and
        that keeps `max_examples_per_user` cut points per user (0: all). auto is "last" when every cut
        point already is an example (each position is then a training signal of its own, with the text
        as it was at that point; "all" would add the same signals again at about twice the cost per step,
        measured on ML-100K) or when user_text folds in recent titles ("all" would leak a slot's target
        through them into its input); "all" otherwise."""
        if self.positions != "auto":
            return self.positions
        return "all" if text_history == 0 and max_examples_per_user > 0 else "last"

    @property
    def monitor_beta(self) -> float:
        """The beta of train-time recall: the forced --beta, else MONITOR_BETA."""
        return MONITOR_BETA if self.beta is None else float(self.beta)


@dataclasses.dataclass(frozen=True)
class TrainSummary:
    run_dir: str
    num_segments: int
    epochs_run: int
    best_recall: float
    metrics: dict
    seconds: float
    beta: float = 0.0


def build_encoder(config: TrainConfig, texts) -> TextEncoder:
    if config.encoder == "tiny":
        return TextEncoder.tiny(texts, sequence_length=min(config.sequence_length, 64), seed=config.seed)
    preset = None if config.encoder == "minilm" else config.encoder
    return TextEncoder.pretrained(preset, sequence_length=config.sequence_length,
                                  trainable_layers=config.finetune_layers)


def _text_cache(config: TrainConfig, encoder: TextEncoder, texts, out_dir: str) -> TextCache:
    path = rd.path(out_dir, rd.TEXT_CACHE)
    for candidate in (path, config.text_cache):
        if candidate and tf.io.gfile.exists(candidate):
            cache = TextCache.load(candidate)
            if not cache.missing(texts) and cache.dim == encoder.compute_output_shape((None,))[-1]:
                _LOG.info("text cache: reusing %s (%d texts)", candidate, len(cache))
                if candidate != path:
                    cache.save(path)
                return cache
    _LOG.info("text cache: encoding %d distinct user texts once (frozen encoder)", len(texts))
    cache = TextCache.build(encoder, texts, batch_size=64, progress=config.verbose > 0)
    cache.save(path)
    return cache


def _model(config: TrainConfig, catalog, encoder: TextEncoder, num_segments: int, mixed: bool,
           rule: str = ex.REPEATS_EXCLUDE, max_history: int = features.MAX_HISTORY,
           text_history: int = features.TEXT_HISTORY, max_examples_per_user: int = 0, *,
           train_steps: int) -> SegRecModel:
    text_dim = int(encoder.compute_output_shape((None,))[-1])
    model = SegRecModel.from_catalog(
        catalog,
        embedding_dim=config.embedding_dim, item_id_dim=config.embedding_dim, item_text_dim=config.embedding_dim,
        category_dim=max(4, config.embedding_dim // 2), text_input_dim=text_dim, user_text_dim=config.embedding_dim,
        user_hidden_units=(2 * config.embedding_dim,), user_id_buckets=config.user_id_buckets,
        num_segments=num_segments, segment_temperature=config.segment_temperature, alpha=config.alpha,
        retrieval_temperature=config.retrieval_temperature, finetune_layers=config.finetune_layers,
        history_encoder=config.history_encoder, max_history=max_history, history_layers=config.history_layers,
        history_heads=config.history_heads, history_dropout=config.history_dropout,
        empty_history_rate=config.empty_history_rate,
        loss=config.loss_for(len(catalog.item_ids)), exclude_seen=rule == ex.REPEATS_EXCLUDE,
        item_prior=config.item_prior, cold_query=config.cold_query, positions=config.positions_for(text_history, max_examples_per_user),
        use_text=config.use_text,
        text_encoder=encoder, mixed_precision=mixed, seed=config.seed,
    )
    model.compile(optimizer=_optimizer(config, train_steps))
    return model


def _optimizer(config: TrainConfig, train_steps: int) -> keras.optimizers.Optimizer:
    """Adam (AdamW when --weight-decay > 0) at --learning-rate, constant or decayed to 0 by a cosine
    over `train_steps` (every step of warm-up and joint training). The schedule reads the optimizer's
    step counter, which BackupAndRestore restores: a resumed run continues the same curve."""
    lr = config.learning_rate
    if config.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=max(int(train_steps), 1))
    if config.weight_decay > 0:
        return keras.optimizers.AdamW(lr, weight_decay=config.weight_decay)
    return keras.optimizers.Adam(lr)


def steps_per_epoch(config: TrainConfig, num_train_examples: int) -> int:
    """Optimizer steps per epoch: --steps-per-epoch, else one pass over the training examples."""
    return max(config.steps_per_epoch or -(-int(num_train_examples) // config.batch_size), 1)


def total_train_steps(config: TrainConfig, num_train_examples: int) -> int:
    """Optimizer steps of a run that goes to its last epoch: (warm-up + joint epochs) x steps per epoch."""
    return (config.warmup_epochs + config.epochs) * steps_per_epoch(config, num_train_examples)


class _Throughput(keras.callbacks.Callback):
    """Training examples per second, per epoch (input pipeline included)."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        self.rates = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        rate = self._steps * self.batch_size / max(time.perf_counter() - self._start, 1e-9)
        self.rates.append(rate)
        if logs is not None:
            logs["examples_per_s"] = rate


def train(config: TrainConfig, env: Mapping[str, str] = None) -> TrainSummary:
    """Runs (or resumes) a training run; `env` is the process environment
    (TF_CONFIG / CLUSTER_SPEC / AIP_* for distribution and Vertex AI)."""
    env = dict(env or {})
    start = time.time()
    keras.utils.set_random_seed(config.seed)
    strategy, strategy_desc = distribution.choose_strategy(env)
    cluster = distribution.cluster_from_env(env)
    is_chief = cluster is None or cluster.is_chief
    dirs = distribution.run_dirs(config.output_dir, env)
    # Non-chief workers of a multi-worker run write to a temp dir that is
    # deleted at the end: only the chief's run dir is real.
    out_dir = distribution.chief_or_temp_dir(dirs.model_dir, cluster)
    ckpt_root = distribution.chief_or_temp_dir(dirs.checkpoint_dir, cluster)
    tf.io.gfile.makedirs(out_dir)
    _LOG.info("train: %s -> %s (%s)", config.dataset_dir, out_dir, strategy_desc)
    rd.write_json(rd.path(out_dir, rd.TRAIN_CONFIG), dataclasses.asdict(config))
    mixed = bool(tf.config.list_physical_devices("GPU")) if config.mixed_precision is None else config.mixed_precision

    da.require_validation(config.dataset_dir)
    rule = da.repeat_rule(config.dataset_dir)
    catalog = data_lib.load_catalog(config.dataset_dir)
    # The train and valid splits only: training never opens the test split (eval-*).
    texts = data_lib.distinct_user_texts(config.dataset_dir, (ex.TRAIN, ex.VALID))
    valid_queries = da.load_queries(config.dataset_dir, ex.VALID, catalog.item_ids, rule)
    if not valid_queries.candidates.main.any():
        raise ValueError(f"{config.dataset_dir}: the validation split has no query to rank under the "
                         f"{rule!r} repeat rule; nothing to select epochs or beta on")
    _LOG.info("validation: %d queries (%d repeat targets, repeat rule %r)", len(valid_queries),
              int(valid_queries.candidates.repeat.sum()), rule)
    warm_path = rd.path(ckpt_root, "warmup.weights.h5")
    backup_dir = rd.path(ckpt_root, "main")
    best_path = rd.path(ckpt_root, "best.weights.h5")

    with strategy.scope():
        encoder = build_encoder(config, texts)
        cache = _text_cache(config, encoder, texts, out_dir) if config.finetune_layers == 0 else None
        k0 = config.segments if isinstance(config.segments, int) else config.segments_range[0]
        metadata = da.metadata(config.dataset_dir)
        policy = metadata.get("split", {})
        num_train = int(metadata.get("examples", {}).get(ex.TRAIN, 0))
        steps = total_train_steps(config, num_train)
        model = _model(config, catalog, encoder, k0, mixed, rule, int(policy.get("max_history", features.MAX_HISTORY)),
                       int(policy.get("text_history", features.TEXT_HISTORY)),
                       int(policy.get("max_examples_per_user", 0)), train_steps=steps)

    def dataset(split, shuffle):
        return data_lib.make_dataset(config.dataset_dir, split, config.batch_size, shuffle=shuffle, seed=config.seed,
                                     text_cache=cache, drop_remainder=False)

    train_ds, valid_ds = dataset(ex.TRAIN, True), dataset(ex.VALID, False)
    history: dict = {}
    throughput = _Throughput(config.batch_size)
    tb = keras.callbacks.TensorBoard(log_dir=dirs.tensorboard_dir, update_freq="epoch")

    # Phase 2: warm-up (retrieval only).
    if config.warmup_epochs > 0:
        if tf.io.gfile.exists(warm_path):
            _LOG.info("warm-up: resuming from %s", warm_path)
            rd.load_weights(model, warm_path)
        else:
            _LOG.info("warm-up: %d epoch(s) of retrieval loss only", config.warmup_epochs)
            model.cluster_weight.assign(0.0)
            h = model.fit(train_ds, epochs=config.warmup_epochs, steps_per_epoch=config.steps_per_epoch,
                          callbacks=[throughput, tb], verbose=config.verbose, shuffle=False)
            _merge(history, h.history, prefix="warmup_")
            rd.save_weights(model, warm_path)

    # Phase 3: number of segments (on the validation queries' embeddings) and centroid initialisation.
    sweep = None
    if config.segments == "auto":
        sweep_path = rd.path(out_dir, rd.SEGMENT_SWEEP)
        if tf.io.gfile.exists(sweep_path):
            sweep = rd.read_json(sweep_path)
        else:
            best_k, scores = training.choose_segments(model, valid_ds, tuple(config.segments_range), seed=config.seed)
            sweep = {"best_k": int(best_k), "silhouette": [[int(k), float(s)] for k, s in scores], "split": ex.VALID}
            rd.write_json(sweep_path, sweep)
        _LOG.info("segments auto: K=%d (silhouette sweep on validation %s)", sweep["best_k"], sweep["silhouette"])
        if sweep["best_k"] != model.num_segments:
            with strategy.scope():
                model = model.with_num_segments(sweep["best_k"])
                model.compile(optimizer=_optimizer(config, steps))
    resuming = tf.io.gfile.exists(rd.path(backup_dir, "training_metadata.json"))
    if not resuming:
        training.init_segments(model, train_ds, batches=50)
        # The schedule goes on from the warm-up's last step, also when the model was rebuilt for the chosen K
        # (a fresh optimizer) or the warm-up weights were read back from disk (BackupAndRestore restores the
        # counter of a resumed joint phase itself).
        model.optimizer.iterations.assign(config.warmup_epochs * steps_per_epoch(config, num_train))
    model.cluster_weight.assign(config.alpha)

    # Phase 4: joint training with early stopping and the best checkpoint on the validation metric.
    recall = training.ValidationMetric(valid_queries, config.select_metric, beta=config.monitor_beta, text_cache=cache)
    callbacks = [
        recall,
        # double_checkpoint: a process killed while writing the backup leaves the previous one to resume from.
        keras.callbacks.BackupAndRestore(backup_dir, double_checkpoint=True),
        keras.callbacks.ModelCheckpoint(best_path, monitor=recall.monitor, mode="max", save_best_only=True,
                                        save_weights_only=True),
        throughput, tb,
    ]
    if config.patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=recall.monitor, mode="max", patience=config.patience))
    h = model.fit(train_ds, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch, callbacks=callbacks,
                  verbose=config.verbose, shuffle=False)
    _merge(history, h.history)
    if tf.io.gfile.exists(best_path):
        rd.load_weights(model, best_path)

    # Phase 5: beta on validation (unless forced).
    if config.beta is None:
        beta, beta_curve = training.choose_beta(model, valid_queries, config.beta_grid, config.select_metric, cache)
        _LOG.info("beta: %g chosen on validation (%s by beta: %s)", beta, config.select_metric, beta_curve)
    else:
        beta = float(config.beta)
        beta_curve = [(beta, training.validation_metric(model, valid_queries, config.select_metric, beta, cache))]
    best = dict(beta_curve)[beta]
    monitored = history.get(recall.monitor, [])
    metrics = {
        "history": history,
        "final": {config.select_metric: best, "beta": beta, "split": ex.VALID},
        "epochs_run": len(history.get("loss", [])),
        "optimizer_steps": int(model.optimizer.iterations.numpy()),
        "selection": selection_record(config, rule, valid_queries, monitored, recall.monitor, beta, beta_curve, sweep),
        "throughput_examples_per_s": {"mean": float(np.mean(throughput.rates)) if throughput.rates else None,
                                      "encoder": "cached" if cache is not None else "in-graph"},
        "strategy": strategy_desc,
        "segment_sweep": sweep,
    }
    segments_doc = build_segments(model, config, catalog, cache, beta)
    if is_chief:
        rd.save_model(out_dir, model)
        rd.write_json(rd.path(out_dir, rd.METRICS), metrics)
        # The run's beta is the chosen one: evaluate, the segment report and export read it from here.
        rd.write_json(rd.path(out_dir, rd.TRAIN_CONFIG),
                      {**dataclasses.asdict(config), "beta": beta, "beta_requested": config.beta, "repeats": rule})
        segments_document.save(segments_doc, rd.path(out_dir, rd.SEGMENTS))
        write_model_card(out_dir, config, metrics, segments_doc)
    else:
        distribution.discard_temp_dir(dirs.model_dir, cluster)
        distribution.discard_temp_dir(dirs.checkpoint_dir, cluster)
    return TrainSummary(out_dir, int(model.num_segments), metrics["epochs_run"], best, metrics, time.time() - start,
                        beta)


def selection_record(config: TrainConfig, rule: str, valid_queries, monitored, monitor: str, beta: float,
                     beta_curve, sweep) -> dict:
    """metrics.json's "selection": what training chose, on which split, by which measure."""
    best_epoch = int(np.argmax(monitored)) + 1 if len(monitored) else None
    return {
        "split": ex.VALID,
        "repeats": rule,
        "metric": config.select_metric,
        "queries": {"ranked": int(valid_queries.candidates.main.sum()),
                    "repeat_targets": int(valid_queries.candidates.repeat.sum()),
                    "unknown_target": int(valid_queries.unknown_target)},
        "checkpoint": {"monitor": monitor, "monitor_beta": config.monitor_beta, "best_epoch": best_epoch,
                       "best_value": float(max(monitored)) if len(monitored) else None,
                       "per_epoch": [float(v) for v in monitored], "patience": config.patience},
        "beta": {"chosen": beta, "forced": config.beta is not None,
                 "grid": [[float(b), float(v)] for b, v in beta_curve]},
        "num_segments": ({"chosen": sweep["best_k"], "by": "silhouette", "split": sweep.get("split", ex.TRAIN),
                          "sweep": sweep["silhouette"]} if sweep else {"chosen": config.segments, "forced": True}),
    }


def _merge(history: dict, h: dict, prefix: str = "") -> None:
    for key, values in h.items():
        history.setdefault(prefix + key, []).extend(float(v) for v in values)




def build_segments(model: SegRecModel, config: TrainConfig, catalog, cache, beta: float) -> dict:
    from trainer.segments import quality as segment_quality

    # Each user as of their latest validation query, else their latest training one: never test.
    user_ids, emb, seg, probs, train_split = user_snapshot(model, config.dataset_dir, cache, beta,
                                                           splits=(ex.VALID, ex.TRAIN))
    quality = segment_quality.segment_quality(emb, seg)
    quality = {k: v for k, v in quality.items() if k in ("silhouette", "davies_bouldin", "largest_share")}
    histories = {}
    for u, i in zip(train_split.user_ids, train_split.item_ids):
        histories.setdefault(u, []).append(i)
    inputs = segment_profiles.ProfileInputs(
        user_ids=list(user_ids), labels=seg, centroids=np.asarray(model.segment_head.centroids),
        histories=histories, attributes=da.load_users(config.dataset_dir),
        item_titles=dict(zip(catalog.item_ids, catalog.titles)),
        item_categories=dict(zip(catalog.item_ids, catalog.categories)), probs=probs)
    return segment_profiles.build_profiles(inputs, quality=quality,
                                           extra={"beta": beta, "dataset_dir": config.dataset_dir})


def write_model_card(out_dir: str, config: TrainConfig, metrics: dict, segments: dict) -> None:
    meta_path = config.dataset_dir.rstrip("/") + "/" + features.METADATA_FILE
    meta = rd.read_json(meta_path) if tf.io.gfile.exists(meta_path) else {}
    final = metrics["final"]
    lines = [
        "# segrec model card", "",
        f"- Trained: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- Data: `{config.dataset_dir}` (source: {meta.get('source', {}).get('name', 'unknown')}, "
        f"split: {meta.get('split', {}).get('split', 'unknown')}, examples: {meta.get('examples', {})})",
        f"- Encoder: {config.encoder} (sequence length {config.sequence_length}, "
        f"{'fine-tuning top ' + str(config.finetune_layers) + ' layers' if config.finetune_layers else 'frozen, cached outputs'})",
        f"- Embedding dim {config.embedding_dim}; segments {segments['num_segments']}; alpha {config.alpha}; "
        f"beta {final['beta']} ({'forced' if config.beta is not None else 'chosen on the validation split'})",
        f"- Epochs run: {metrics['epochs_run']} (max {config.epochs}, warm-up {config.warmup_epochs}); "
        f"strategy: {metrics['strategy']}",
        "", f"## Metrics (validation split, full catalog, repeat rule: {metrics['selection']['repeats']}; "
        f"best epoch {metrics['selection']['checkpoint']['best_epoch']} chosen on it)", "",
        *[f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in final.items()],
        "", "## Segments", "",
        "| id | size | label |", "| --- | ---: | --- |",
        *[f"| {s['id']} | {s['size']} | {s['label']} |" for s in segments["segments"]],
        "", "## Intended use and limits", "",
        "Candidate retrieval for recommendations with segment-aware queries. Segments describe groups, "
        f"never individuals: segments under {segments['min_profile_size']} users are not profiled. "
        "Quality figures hold for the evaluated split only; re-evaluate after data drift (`segrec evaluate`).",
    ]
    with tf.io.gfile.GFile(rd.path(out_dir, rd.MODEL_CARD), "w") as f:
        f.write("\n".join(lines) + "\n")


def format_summary(summary: TrainSummary, config: TrainConfig) -> str:
    m = summary.metrics
    rate = m["throughput_examples_per_s"]["mean"] or 0.0
    return "\n".join([
        f"train finished in {summary.seconds:.1f}s -> {summary.run_dir}",
        f"  epochs run {summary.epochs_run}   segments {summary.num_segments}   "
        f"validation {config.select_metric} {summary.best_recall:.4f} (beta {summary.beta:g})   "
        f"throughput {rate:,.0f} examples/s ({m['throughput_examples_per_s']['encoder']} encoder)",
        f"  model     {rd.path(summary.run_dir, rd.WEIGHTS)}",
        f"  segments  {rd.path(summary.run_dir, rd.SEGMENTS)}",
        f"  metrics   {rd.path(summary.run_dir, rd.METRICS)}",
        f"  card      {rd.path(summary.run_dir, rd.MODEL_CARD)}",
        f"  tensorboard --logdir {rd.path(summary.run_dir, rd.TENSORBOARD)}",
    ])
