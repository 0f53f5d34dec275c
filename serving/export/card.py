"""What an export says about itself: export.json's fields (read back by
servers and batch scoring; the file is written by serving/export/layout.py),
model_card.md (for people; never parsed back) and the CLI's summary.

`summary` is an exporter.ExportSummary, `config` an exporter.ExportConfig,
`run` a trainer.model.run_dir.TrainedRun.
"""

from __future__ import annotations

import datetime

import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from serving.export import graph_ops, layout, quantize
from serving.export import index as ix
from trainer import contracts
from trainer.data import examples as data_examples
from trainer.model import run_dir as rd

RECALL_K = 10


def export_info(summary, config, run) -> dict:
    """What export.json holds: the defaults servers and batch scoring read back (never the model card)."""
    return {
        "version": summary.version,
        "k": summary.default_k,
        "beta": summary.default_beta,
        "k_max": config.k_max,
        "index": summary.index,
        "num_items": summary.num_items,
        "embedding_dim": summary.embedding_dim,
        "num_segments": summary.num_segments,
        "scann_recall_at_10": summary.recall_at_10,
        # Held-out (validation) queries the recall was measured on, and the disjoint ones ScaNN's
        # search depth was tuned on (0 / 0 for brute force).
        "scann_recall_queries": summary.recall_queries,
        "scann_tuning_queries": summary.recall_tuning_queries,
        layout.SIGNATURES_KEY: list(summary.signatures),
        layout.REPEATS: summary.repeats,
        "text_input": summary.text_input,
        "tokenizer": summary.tokenizer,
        "encoder_precision": summary.encoder_precision,
        "encoder_quality": summary.encoder_quality.as_dict() if summary.encoder_quality else None,
        "non_core_ops": summary.non_core_ops,
        "target": config.target,
        "run_dir": config.run_dir,
        "dataset_dir": run.dataset_dir,
    }


def model_card(summary, config, run) -> str:
    metrics_path = rd.path(config.run_dir, rd.METRICS)
    final = rd.read_json(metrics_path).get("final", {}) if tf.io.gfile.exists(metrics_path) else {}
    recall = (
        f"{summary.recall_at_10:.4f} on {summary.recall_queries} held-out (validation split) queries not used "
        f"for tuning (the search depth was tuned on {summary.recall_tuning_queries} other held-out queries)"
        if summary.recall_at_10 is not None
        else "1.0 (exact search)"
    )
    users = ("input_ids, padding_mask (token ids, see export.json's tokenizer)"
             if summary.text_input == "token_ids" else "user_text")
    lines = [
        f"# segrec model card — version {summary.version}",
        "",
        f"- Exported: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- Run dir: `{config.run_dir}`",
        f"- Training data: `{run.dataset_dir}`",
        f"- Encoder: {run.train_config.get('encoder')} (finetune layers: {run.train_config.get('finetune_layers', 0)})",
        f"- Segments: {summary.num_segments}"
        + (f" (centroids from `{config.segments_path}`)" if config.segments_path else " (from the run)"),
        f"- Catalog: {summary.num_items:,} items, embedding dim {summary.embedding_dim}",
        "",
        "## Text encoder",
        "",
        *quantize.describe(summary.encoder_quality, summary.encoder_precision),
        f"- Quality gate: top-10 overlap >= {config.min_overlap} (--min-overlap)"
        if summary.encoder_precision != quantize.FLOAT32 else "- Quality gate: none (float32 as trained)",
        "- Padding: each batch to its longest row, rounded up to a bucket "
        f"({', '.join(str(w) for w in summary.tokenizer['bucket_widths'])} tokens)",
        "",
        "## Index",
        "",
        f"- Kind: {summary.index} ({summary.index_params})",
        f"- Recall@{RECALL_K} vs brute force: {recall}; required >= {config.min_recall}",
        "",
        "## Ops a server needs",
        "",
        *graph_ops.describe(summary.non_core_ops, config.target),
        "",
        "## Signatures",
        "",
        f"- `{contracts.SERVING_DEFAULT}`: {users}, history_item_ids, k (1..{config.k_max}), beta -> "
        "item_ids, scores, segment_id, segment_probs",
        f"- `{contracts.RECOMMEND_DEFAULTS}`"
        + (f", `{contracts.SERVING_TF_EXAMPLE}`" if contracts.SERVING_TF_EXAMPLE in summary.signatures else "")
        + f": k = {summary.default_k}, beta = {summary.default_beta}",
        f"- `{contracts.USER_EMBEDDING}`: embedding, segment_id, segment_probs",
        f"- `{contracts.SERVING_EXCLUDE}`: as `{contracts.SERVING_DEFAULT}` plus exclude_item_ids [B, E] "
        "(\"\" padded), never returned either",
        "- Items in history_item_ids are never returned.",
        f"- Repeat rule of the training data: {summary.repeats} ("
        + ("batch scoring removes each user's whole consumed set" if summary.repeats == data_examples.REPEATS_EXCLUDE
           else "re-consumption is a legitimate recommendation; batch scoring removes only the history")
        + ")",
        "",
        "## Training metrics (final eval)",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in final.items()] or ["- (none recorded)"]
    return "\n".join(lines) + "\n"


def format_summary(summary) -> str:
    recall = ("exact" if summary.recall_at_10 is None else
              f"{summary.recall_at_10:.4f} ({summary.recall_queries} held-out queries; depth tuned on "
              f"{summary.recall_tuning_queries} others)")
    quality = summary.encoder_quality
    encoder = summary.encoder_precision + (
        f" (top-10 overlap with float32 {quality.overlap_at_10:.4f}, Recall@50 "
        f"{quality.recall['recall_at_50']:.4f} vs {quality.recall_float32['recall_at_50']:.4f})" if quality else "")
    return "\n".join(
        [
            f"exported version {summary.version} -> {summary.version_dir} in {summary.seconds:.1f}s",
            f"  index        {summary.index}: {summary.index_params}",
            f"  recall@10    {recall} vs brute force",
            f"  encoder      {encoder}",
            f"  catalog      {summary.num_items:,} items x {summary.embedding_dim} dims, "
            f"{summary.num_segments} segments",
            f"  defaults     k={summary.default_k} beta={summary.default_beta}",
            f"  signatures   {', '.join(summary.signatures)} (text input: {summary.text_input})",
            f"  server ops   {', '.join(summary.non_core_ops) or 'core TensorFlow only'}",
            f"  size         {summary.size_bytes / 1e6:.2f} MB",
        ]
    )


def describe_index(index) -> str:
    if isinstance(index, ix.ScannIndex):
        text = index.params.describe()
        if index.params.partitioned:
            text += f"; tuned to search {int(index.leaves_to_search.numpy())} leaves"
        return text
    return "exact matmul + top_k"
