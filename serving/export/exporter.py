"""`segrec export`: a trained run dir -> a servable SavedModel version.

    <base_path>/segrec/<version>/
      saved_model.pb, variables/      ServingModule (serving/export/signatures.py)
      assets.extra/tf_serving_warmup_requests
                                      PredictionLog records (serving_default, serving_exclude)
      segments.json                   the run's, or the --segments-file override
      model_card.md                   data, metrics, date, index, recall@10

The version is written to a hidden temp dir beside it and renamed into place
last, so TF Serving (which polls the base path for numeric dirs) never sees
a half-written version. Before the rename the export is reloaded and its
warm-up request answered, and the answer must match the in-memory module.

ScaNN exports are checked at export time: recall@10 of the index against
brute force over the same item embeddings, on the segment-aware queries of
held-out users (validation split; never the test split). The distinct
held-out queries are split in two halves with the seed (`split_queries`):
the search depth is tuned on one (`index.tune_leaves`), and the recall
reported (model card, export.json, summary) and gated is measured on the
other, so it is the recall of queries the tuning never saw. Below
`min_recall` the export fails (`RecallTooLow`, the CLI exits non-zero) and
nothing is published.

export.json also records the repeat rule the model was trained with
("repeats": exclude | allow, from the run's train_config.json, else the
dataset's metadata.json): batch scoring removes a user's whole consumed set
(serving_exclude) only under "exclude".

Two more gates, each failing the export (exit 2) before anything is published:
  * `encoder_precision` float16 / int8 (serving/export/quantize.py): the
    top-10 overlap with the float32 model on held-out queries must reach
    `min_overlap` (`quantize.OverlapTooLow`);
  * the SavedModel's non-core ops, read from the saved graph
    (serving/export/graph_ops.py), must all be registered by `target`
    (`graph_ops.MissingOps`). Both land in the model card and export.json.
`text_input="token_ids"` exports signatures over client-side token ids and
ships the vocabulary (assets.extra/vocab.txt), so no text op is in the graph.
Text exports also carry encode_text and serving_text_vector (the text-vector
cache's split of serving_default), checked against serving_default on the
warm-up users before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from serving.export import card, graph_ops, layout, quantize
from serving.export import index as ix
from serving.export import signatures as sig
from serving.export.layout import join as _join
from serving.export.layout import load_exported, model_dir, next_version  # noqa: F401  (load_exported: re-exported)
from trainer import contracts, features
from trainer.data import examples as data_examples
from trainer.model import run_dir as rd
from trainer.model import token_ids as tok
from trainer.segments import document as segments_doc

RECALL_K = card.RECALL_K
WARMUP_USERS = 4


class RecallTooLow(ValueError):
    """The ScaNN index misses too much of brute force's top-k."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Settings of one `segrec export`.

    run_dir: what `segrec train` wrote. base_path: the model base path; the
    version goes to <base_path>/segrec/<version>/. version: None = one more
    than the highest existing. index: "scann" | "brute_force". k_max: the
    largest k a request may ask for. min_recall: the least ScaNN recall@10
    against brute force. segments_path: a refreshed segments.json whose
    centroids replace the model's. recall_queries: held-out queries of the
    recall and overlap checks. default_k, default_beta: the knobs of
    recommend_defaults and serving_tf_example (default_beta None = the run's
    beta). encoder_precision: float32 | float16 | int8 (quantize.py);
    min_overlap: the least top-10 overlap of a quantised encoder with float32.
    target: the server the ops are checked for (graph_ops.TARGETS).
    text_input: "text" or "token_ids" (signatures.py).
    """

    run_dir: str
    base_path: str
    version: Optional[int] = None
    index: str = ix.SCANN
    k_max: int = 100
    min_recall: float = 0.95
    segments_path: Optional[str] = None
    recall_queries: int = 1000
    overwrite: bool = False
    default_k: int = 10
    default_beta: Optional[float] = None
    seed: int = 0
    encoder_precision: str = quantize.FLOAT32
    min_overlap: float = 0.95
    target: str = graph_ops.SEGREC_SERVE
    text_input: str = sig.TEXT


@dataclasses.dataclass
class ExportSummary:
    version_dir: str
    version: int
    index: str
    index_params: str
    recall_at_10: Optional[float]  # None for brute_force (exact by construction)
    recall_queries: int
    num_items: int
    embedding_dim: int
    num_segments: int
    default_k: int
    default_beta: float
    size_bytes: int
    seconds: float
    signatures: tuple = sig.SIGNATURES
    text_input: str = sig.TEXT
    tokenizer: Optional[dict] = None  # token_ids.tokenizer_info
    encoder_precision: str = quantize.FLOAT32
    encoder_quality: Optional[quantize.QualityCheck] = None  # None for float32
    non_core_ops: list = dataclasses.field(default_factory=list)
    recall_tuning_queries: int = 0  # held-out queries ScaNN's depth was tuned on (disjoint from recall_queries)
    repeats: str = data_examples.DEFAULT_REPEATS  # the repeat rule of the training data (trainer.data.examples.REPEAT_RULES)


# --- versions -------------------------------------------------------------------
# --- the export ----------------------------------------------------------------------
def export(config: ExportConfig, progress: bool = False) -> ExportSummary:
    start = time.time()
    _check_config(config)
    version = config.version if config.version is not None else next_version(config.base_path)
    final_dir = _join(model_dir(config.base_path), str(version))
    if tf.io.gfile.exists(final_dir) and not config.overwrite:
        raise FileExistsError(f"{final_dir} exists; pass --overwrite or another --version")

    refreshed = segments_doc.load(config.segments_path, "--segments-file") if config.segments_path else None
    if refreshed is not None:
        segments_doc.centroids(refreshed, config.segments_path)  # a malformed file fails before the run loads
    _say(progress, f"loading run {config.run_dir}")
    run = rd.load_run(config.run_dir)
    model = run.model
    segments = run.segments
    if refreshed is not None:
        apply_centroids(model, refreshed, config.segments_path)
        segments = refreshed
        _say(progress, f"segment centroids from {config.segments_path}")
    beta = float(run.train_config.get("beta", 0.0)) if config.default_beta is None else float(config.default_beta)
    embeddings = model.item_embeddings().numpy()

    serving_model, quality = model, None
    if config.encoder_precision != quantize.FLOAT32:
        _say(progress, f"{config.encoder_precision} encoder: comparing with float32 on held-out queries")
        serving_model = quantize.model_with_precision(model, config.encoder_precision)
        quality = quantize.compare(model, serving_model, heldout_batches(run, config.recall_queries, beta, config.seed),
                                   config.encoder_precision)
        _say(progress, f"top-10 overlap with float32 {quality.overlap_at_10:.4f}, Recall@50 "
                       f"{quality.recall['recall_at_50']:.4f} (float32 {quality.recall_float32['recall_at_50']:.4f})")
        quantize.check(quality, config.min_overlap)

    _say(progress, f"building the {config.index} index over {len(embeddings):,} items")
    index = ix.build_index(config.index, embeddings, k_max=config.k_max)
    recall, num_queries, num_tuning = None, 0, 0
    if config.index == ix.SCANN:
        queries = heldout_queries(run, config.recall_queries, beta, config.seed)
        recall, num_tuning, num_queries = scann_recall(index, queries, embeddings, config.min_recall, config.seed)
        _say(progress, f"ScaNN recall@{RECALL_K} vs brute force: {recall:.4f} on {num_queries} held-out queries "
                       f"(search depth tuned on {num_tuning} others)")
        if recall < config.min_recall:
            raise RecallTooLow(
                f"ScaNN recall@{RECALL_K} against brute force is {recall:.4f} on {num_queries} held-out "
                f"queries not used for tuning, below --min-recall {config.min_recall}; export with "
                "--index brute_force or lower --min-recall"
            )

    module = sig.ServingModule(serving_model, index, k_max=config.k_max, default_k=config.default_k,
                               default_beta=beta, text_input=config.text_input)
    warmup = warmup_inputs(run, min(config.default_k, config.k_max), beta, config.text_input)
    expected = module.serving_default(warmup)
    sig.check_text_vector_path(module, warmup, expected)  # encode_text + serving_text_vector == serving_default
    # serving_exclude's warm-up: the same users, each without serving_default's best item.
    warmup_exclude = {**warmup, features.EXCLUDE_ITEM_IDS: expected[features.OUT_ITEM_IDS][:, :1]}
    expected_exclude = module.serving_exclude(warmup_exclude)

    tmp_dir = _join(model_dir(config.base_path), f".tmp-{version}-{os.getpid()}")
    if tf.io.gfile.exists(tmp_dir):
        tf.io.gfile.rmtree(tmp_dir)
    _say(progress, f"writing {final_dir}")
    try:
        summary = _write_version(tmp_dir, final_dir, version, config, run, module, warmup, expected, progress,
                                 quality=quality, index=index, recall=recall, num_queries=num_queries,
                                 embeddings=embeddings, beta=beta, segments=segments,
                                 exclude=(warmup_exclude, expected_exclude), num_tuning=num_tuning)
    except BaseException:
        tf.io.gfile.rmtree(tmp_dir)  # a failed export leaves nothing behind
        raise
    if tf.io.gfile.exists(final_dir):
        tf.io.gfile.rmtree(final_dir)
    tf.io.gfile.rename(tmp_dir, final_dir)
    summary.size_bytes = dir_size(final_dir)
    summary.seconds = time.time() - start
    return summary


def _write_version(tmp_dir, final_dir, version, config, run, module, warmup, expected, progress, *, quality, index,
                   recall, num_queries, embeddings, beta, segments, exclude=None, num_tuning=0) -> ExportSummary:
    """Saves, reloads, checks and documents the version in `tmp_dir` (not yet published)."""
    tf.saved_model.save(
        module,
        tmp_dir,
        signatures=module.signatures(),
        options=tf.saved_model.SaveOptions(namespace_whitelist=ix.SAVE_NAMESPACES),
    )
    requests = [warmup] + ([(contracts.SERVING_EXCLUDE, exclude[0])] if exclude is not None else [])
    write_warmup(_join(tmp_dir, contracts.WARMUP_FILE), requests)
    encoder = run.model.text_encoder
    if config.text_input == sig.TOKEN_IDS:
        tok.write_vocabulary(encoder, tmp_dir)
    reloaded = load_exported(tmp_dir)
    verify(tmp_dir, warmup, expected, loaded=reloaded)
    if exclude is not None:
        verify(tmp_dir, exclude[0], exclude[1], contracts.SERVING_EXCLUDE, loaded=reloaded)
    del reloaded
    ops = graph_ops.non_core_ops(tmp_dir)
    _say(progress, f"non-core ops: {', '.join(ops) or 'none'}; checking them for --target {config.target}")
    graph_ops.check(ops, config.target)
    if segments is not None:
        segments_doc.save(segments, _join(tmp_dir, contracts.SEGMENTS_FILE))
    summary = ExportSummary(
        version_dir=final_dir,
        version=version,
        index=config.index,
        index_params=card.describe_index(index),
        recall_at_10=recall,
        recall_queries=num_queries,
        num_items=len(embeddings),
        embedding_dim=int(embeddings.shape[1]),
        num_segments=run.model.num_segments,
        default_k=config.default_k,
        default_beta=beta,
        size_bytes=0,
        seconds=0.0,
        signatures=tuple(module.signatures()),
        text_input=config.text_input,
        tokenizer=tok.tokenizer_info(encoder, config.text_input),
        encoder_precision=config.encoder_precision,
        encoder_quality=quality,
        non_core_ops=ops,
        recall_tuning_queries=num_tuning,
        repeats=repeat_rule(run),
    )
    _write_text(_join(tmp_dir, contracts.MODEL_CARD), card.model_card(summary, config, run))
    layout.write_export_info(tmp_dir, card.export_info(summary, config, run))
    return summary


def _check_config(config: ExportConfig) -> None:
    if config.index not in ix.INDEX_KINDS:
        raise ValueError(f"--index must be one of {ix.INDEX_KINDS}, got {config.index!r}")
    if config.k_max < 1:
        raise ValueError(f"--k-max must be >= 1, got {config.k_max}")
    if not 1 <= config.default_k <= config.k_max:
        raise ValueError(f"--default-k must be in [1, --k-max={config.k_max}], got {config.default_k}")
    if config.recall_queries < 1:
        raise ValueError(f"--recall-queries must be >= 1, got {config.recall_queries}")
    if config.version is not None and config.version < 1:
        raise ValueError(f"--version must be a positive integer, got {config.version}")
    if config.encoder_precision not in quantize.PRECISIONS:
        raise ValueError(f"--encoder-precision must be one of {quantize.PRECISIONS}, got {config.encoder_precision!r}")
    if not 0.0 <= config.min_overlap <= 1.0:
        raise ValueError(f"--min-overlap must be in [0, 1], got {config.min_overlap}")
    if config.target not in graph_ops.TARGETS:
        raise ValueError(f"--target must be one of {graph_ops.TARGETS}, got {config.target!r}")
    if config.text_input not in sig.TEXT_INPUTS:
        raise ValueError(f"--text-input must be one of {sig.TEXT_INPUTS}, got {config.text_input!r}")


def apply_centroids(model, segments: dict, source: str) -> None:
    """Replaces the model's centroids [K, d] with those of a segments.json
    (same K and d as the model, else a ValueError naming `source`)."""
    centroids = segments_doc.centroids(segments, source)
    want = (model.num_segments, model.embedding_dim)
    if centroids.shape != want:
        raise ValueError(
            f"{source}: centroids have shape {centroids.shape} (K={centroids.shape[0]}, d={centroids.shape[1]}), "
            f"the model needs {want} (K={want[0]} segments x embedding dim d={want[1]}); "
            "refresh segments from this run's model"
        )
    model.segment_head.centroids_var.assign(centroids)


def repeat_rule(run) -> str:
    """The repeat rule the run was trained with: its train_config.json's "repeats", else
    its dataset's metadata.json (trainer.data.arrays.repeat_rule), else the default."""
    from trainer.data import arrays as da

    rule = run.train_config.get("repeats")
    if rule in data_examples.REPEAT_RULES:
        return rule
    try:
        return da.repeat_rule(run.dataset_dir)
    except Exception:  # noqa: BLE001  (a moved or unreadable dataset dir: the default rule)
        return data_examples.DEFAULT_REPEATS


def split_queries(queries: np.ndarray, seed: int = 0) -> tuple:
    """Held-out queries [Q, d] -> (tuning [T, d], measuring [M, d]): the distinct
    queries, shuffled with `seed`, in two halves (the tuning half gets the odd one).
    A query is in at most one half; with fewer than 2 distinct queries there is
    nothing to tune on (tuning is empty, measuring holds the query)."""
    distinct = np.unique(np.asarray(queries, np.float32), axis=0)
    if len(distinct) < 2:
        return distinct[:0], distinct
    order = np.random.default_rng([seed, 1]).permutation(len(distinct))
    half = (len(distinct) + 1) // 2
    return distinct[np.sort(order[:half])], distinct[np.sort(order[half:])]


def scann_recall(index, queries: np.ndarray, embeddings: np.ndarray, min_recall: float, seed: int = 0) -> tuple:
    """Tunes the index's search depth on one half of the held-out queries and
    measures recall@RECALL_K against brute force on the other (split_queries);
    returns (recall, tuning queries, measured queries)."""
    tuning, measuring = split_queries(queries, seed)
    if len(tuning):
        ix.tune_leaves(index, tuning, embeddings, min_recall, k=RECALL_K)
    recall = ix.recall_at_k(index, measuring, embeddings, k=RECALL_K)
    return recall, len(tuning), len(measuring)


def _model_batch(run, split, rows) -> dict:
    batch = split.batch_dict(rows)
    if run.text_cache is not None and not run.text_cache.missing(split.user_texts[rows].astype(str).tolist()):
        # The cached frozen-encoder vectors equal the in-graph encoder's
        # (test_train checks it) and skip BERT.
        batch[features.USER_TEXT_VECTOR] = run.text_cache.lookup(batch[features.USER_TEXT])
    return batch


def heldout_batches(run, limit: int, beta: float, seed: int = 0, batch_size: int = 256) -> list:
    """[(model batch, beta)] of up to `limit` validation-split examples (the train
    split when a dataset has no validation examples), sampled with `seed`; cached
    text vectors added where the run's cache holds the texts.

    ScaNN's search depth and the quantised encoder's overlap gate are chosen or
    checked here, so these queries never come from the test split.
    """
    from trainer.data import arrays as da

    try:
        split = da.load_split(run.dataset_dir, "valid")
    except FileNotFoundError:  # a dataset dir written before the validation split existed
        split = None
    if split is None or len(split) == 0:
        split = da.load_split(run.dataset_dir, "train")
    if len(split) == 0:
        raise ValueError(f"{run.dataset_dir}: no examples to measure the export's recall on")
    rows = np.arange(len(split))
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return [(_model_batch(run, split, rows[s : s + batch_size]), beta) for s in range(0, len(rows), batch_size)]


def heldout_queries(run, limit: int, beta: float, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """Segment-aware queries [Q, d] of heldout_batches (the run's float32 model)."""
    batches = heldout_batches(run, limit, beta, seed, batch_size)
    out = [run.model(batch, training=False, beta=b)[features.QUERY].numpy() for batch, b in batches]
    return np.concatenate(out).astype(np.float32)


def warmup_inputs(run, k: int, beta: float, text_input: str = sig.TEXT, users: int = WARMUP_USERS) -> dict:
    """serving_default inputs for a few eval users (train users if eval is empty);
    token-id exports get the users' texts tokenised as a client would."""
    from trainer.data import arrays as da

    split = da.load_split(run.dataset_dir, "eval")
    if len(split) == 0:
        split = da.load_split(run.dataset_dir, "train")
    batch = split.batch_dict(range(min(users, len(split))))
    hist = batch[features.HISTORY_ITEM_IDS]
    # Trim the all-padding tail so warm-up looks like a real request.
    width = max(1, int(tf.reduce_max(tf.reduce_sum(tf.cast(hist != features.PAD_ITEM_ID, tf.int32), axis=1))))
    inputs = {features.USER_TEXT: batch[features.USER_TEXT], features.HISTORY_ITEM_IDS: hist[:, :width]}
    if text_input == sig.TOKEN_IDS:
        ids, mask = run.model.text_encoder.tokenize(inputs.pop(features.USER_TEXT))
        inputs[features.INPUT_IDS] = ids
        inputs[features.PADDING_MASK] = tf.cast(mask, tf.int32)
    if run.model.user_id_buckets > 0:
        inputs[features.USER_ID] = batch[features.USER_ID]
    rows = int(inputs[features.HISTORY_ITEM_IDS].shape[0])
    inputs[features.K] = tf.fill([rows], tf.constant(k, tf.int32))
    inputs[features.BETA] = tf.fill([rows], tf.constant(beta, tf.float32))
    return inputs


def write_warmup(file_path: str, requests: list) -> None:
    """TFRecord of PredictionLog(PredictRequest) records: each request is serving_default's
    inputs, or (signature name, its inputs)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    tf.io.gfile.makedirs(os.path.dirname(file_path))
    with tf.io.TFRecordWriter(file_path) as writer:
        for entry in requests:
            signature, inputs = entry if isinstance(entry, tuple) else (contracts.SERVING_DEFAULT, entry)
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=contracts.MODEL_NAME, signature_name=signature)
            )
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def verify(version_dir: str, inputs: dict, expected: dict, signature: str = contracts.SERVING_DEFAULT,
           loaded=None) -> None:
    """Reloads the export (or takes it `loaded`) and checks its `signature` answers `inputs` as the module did."""
    got = (loaded or load_exported(version_dir)).signatures[signature](**inputs)
    for key in (features.OUT_ITEM_IDS, features.SEGMENT_ID):
        if not np.array_equal(got[key].numpy(), expected[key].numpy()):
            raise RuntimeError(f"the reloaded export's {key} differ from the in-memory model's")
    np.testing.assert_allclose(got[features.OUT_SCORES].numpy(), expected[features.OUT_SCORES].numpy(), atol=1e-5)


def dir_size(path: str) -> int:
    total = 0
    for root, _, files in tf.io.gfile.walk(path):
        total += sum(tf.io.gfile.stat(_join(root, f)).length for f in files)
    return total


def _write_text(file_path: str, text: str) -> None:
    with tf.io.gfile.GFile(file_path, "w") as f:
        f.write(text)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"segrec export: {message}", flush=True)
