"""`segrec demo`: the main job end to end on the embedded synthetic data.

Each stage prints a numbered header and ends with a one-line result; a stage
that fails stops the demo with its name and what to do about it. The same
flow runs on MovieLens with `--data ml-100k --data-dir PATH`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Optional



@dataclasses.dataclass(frozen=True)
class DemoConfig:
    output_dir: str
    data: str = "generated"  # generated | ml-100k
    data_dir: Optional[str] = None  # ml-100k: local copy
    size: str = "small"
    seed: int = 42
    encoder: str = "minilm"  # tiny for tests / quick looks
    sequence_length: int = 64
    epochs: int = 8
    segments: object = 6
    max_examples_per_user: int = 8  # bounds the distinct texts MiniLM must encode on a CPU
    baselines: tuple = ("popularity", "ease", "id_two_tower")
    beam_args: tuple = ()

    def __post_init__(self):
        if self.data not in ("generated", "ml-100k"):
            raise ValueError(f"--data must be generated or ml-100k, got {self.data!r}")
        if self.data == "ml-100k" and not self.data_dir:
            raise ValueError("--data ml-100k needs --data-dir PATH (a local copy of the MovieLens 100K files)")


class StageError(RuntimeError):
    """A demo stage failed; the message names the stage and what to do."""


@dataclasses.dataclass
class Stage:
    name: str
    run: Callable[[], str]  # returns a one-line result
    advice: str


def _run_stages(stages, echo=print) -> list:
    results = []
    for n, stage in enumerate(stages, 1):
        echo(f"\n[{n}/{len(stages)}] {stage.name}")
        start = time.time()
        try:
            result = stage.run()
        except Exception as err:  # noqa: BLE001 - reported with the stage's name, then re-raised
            raise StageError(f"stage '{stage.name}' failed: {err}\n  what to do: {stage.advice}") from err
        took = time.time() - start
        echo(f"    done in {took:.1f}s: {result}")
        results.append({"stage": stage.name, "seconds": round(took, 2), "result": result})
    return results


def run(config: DemoConfig, echo=print) -> dict:
    """Runs every stage; returns {stage results, paths}. Writes demo_summary.json."""
    from beam_pipelines import examples as ex
    from beam_pipelines import preprocess, readers, synthetic

    raw_dir = os.path.join(config.output_dir, "raw")
    dataset_dir = os.path.join(config.output_dir, "dataset")
    state: dict = {}

    def generate() -> str:
        if config.data == "ml-100k":
            return f"using MovieLens 100K from {config.data_dir}"
        s = synthetic.generate(synthetic.GenerateConfig(output_dir=raw_dir, size=config.size, seed=config.seed), progress=True)
        return (f"{s.num_interactions:,} interactions, {s.num_users:,} users, {s.num_items:,} items, "
                f"{s.num_segments} planted segments in {raw_dir}")

    def prep() -> str:
        if config.data == "ml-100k":
            sources = readers.movielens_100k_sources(config.data_dir)
        else:
            sources = readers.generic_sources(
                os.path.join(raw_dir, "interactions.csv"), os.path.join(raw_dir, "items.csv"), os.path.join(raw_dir, "users.csv"))
        summary = preprocess.run(
            preprocess.PreprocessConfig(sources=tuple(sources), output_dir=dataset_dir, source_name=config.data,
                                        policy=ex.ExamplePolicy(max_examples_per_user=config.max_examples_per_user),
                                        overwrite=True),
            config.beam_args)
        state["preprocess"] = summary.stats
        echo(preprocess.format_summary(summary))
        st = summary.stats
        return f"{st['examples']['train']:,} train / {st['examples']['eval']:,} eval examples in {dataset_dir}"

    run_dir = os.path.join(config.output_dir, "run")
    eval_dir = os.path.join(config.output_dir, "evaluation")

    def train_stage() -> str:
        from trainer import train

        tc = train.TrainConfig(dataset_dir=dataset_dir, output_dir=run_dir, encoder=config.encoder,
                               sequence_length=config.sequence_length, segments=config.segments,
                               epochs=config.epochs, warmup_epochs=1, batch_size=128, recall_k=50,
                               embedding_dim=32, seed=config.seed, patience=3)
        summary = train.train(tc, env={})
        echo(train.format_summary(summary, tc))
        state["train"] = {"recall@50": summary.best_recall, "segments": summary.num_segments}
        return f"{summary.epochs_run} epochs, {summary.num_segments} segments, eval recall@50 {summary.best_recall:.3f}"

    def evaluate_stage() -> str:
        from trainer import evaluate

        ec = evaluate.EvaluateConfig(run_dir=run_dir, output_dir=eval_dir, baselines=config.baselines,
                                     baseline_params=(("id_two_tower", {"epochs": 3}),), seed=config.seed)
        results = evaluate.evaluate(ec)
        echo(evaluate.format_summary(results))
        state["evaluate"] = results["models"]
        seg = results["models"]["segrec"]
        return f"segrec recall@50 {seg['recall@50']:.3f}; report in {eval_dir}/report.md"

    stages = [
        Stage("generate the embedded dataset" if config.data == "generated" else "locate MovieLens 100K", generate,
              "check that --output-dir is writable and has free space"),
        Stage("preprocess (Apache Beam)", prep,
              "read the dead-letter files and the error above; run `segrec preprocess` alone with -v for details"),
        Stage(f"train (encoder {config.encoder}, frozen and cached)", train_stage,
              "run `segrec train` alone with -v; with little memory or time, try --encoder tiny"),
        Stage("evaluate against popularity, EASE and an ID-only two-tower", evaluate_stage,
              "run `segrec evaluate --run-dir` alone with -v for details"),
    ]
    results = _run_stages(stages, echo)
    summary = {"output_dir": config.output_dir, "stages": results, "dataset_dir": dataset_dir, "run_dir": run_dir,
               "evaluation_dir": eval_dir, **state}
    path = os.path.join(config.output_dir, "demo_summary.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    echo(f"\ndemo finished: dataset {dataset_dir}, run {run_dir}, report {eval_dir}/report.md; summary {path}")
    return summary
