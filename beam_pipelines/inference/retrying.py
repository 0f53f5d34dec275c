"""RunInference where a failing batch costs only its failing elements, and their dead letters.

A batch the model rejects (a string the tokenizer or tf.constant refuses,
an in-graph assert, an out-of-memory batch) does not fail the job:
`RunInferenceRetrying` runs Beam's RunInference with exception handling,
sends each element of a failed batch through the same handler alone
(`RetryOneByOne`), and returns the elements that still fail with their
error (`describe_error`). Works with any model handler, keyed or not.
Callers turn those into dead letters with `inference_dead_letter` (source
MODEL_SOURCE, reason INFERENCE_ERROR), so one bad user never costs the
other users of its batch; `check_not_all_rejected` fails a run where the
model rejected everyone.
"""

from __future__ import annotations

import json
import logging

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference

from beam_pipelines import transforms as T
from beam_pipelines.inference import NAMESPACE
from beam_pipelines.sources import records

_LOG = logging.getLogger(NAMESPACE)

# Users whose query the model rejects even alone (dead-letter source MODEL_SOURCE).
MODEL_SOURCE = "model"
INFERENCE_ERROR = "inference_error"
FAILED = "failed"  # RunInferenceRetrying's output of (element, error text) pairs
MAX_ERROR_CHARS = 1000


def describe_error(err: BaseException) -> str:
    """"<Type>: <message>" on one line, at most MAX_ERROR_CHARS, encodable as UTF-8.

    TensorFlow's messages span lines ("Graph execution error: ... assertion
    failed: [...]"); a message may quote the offending text, lone surrogates
    included, which could not be written to a UTF-8 dead-letter file as is.
    """
    text = " ".join(f"{type(err).__name__}: {err}".split())
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _batch_error(error) -> str:
    """The batch's error as Beam's exception handling passes it: (type, repr, traceback lines).

    TensorFlow's errors have an empty repr; the traceback's last line holds the message.
    """
    if isinstance(error, tuple) and len(error) == 3:
        lines = "".join(error[2] or ()).strip().splitlines()
        text = lines[-1] if lines else str(error[1])
    else:
        text = str(error)
    return text[:300]


class RetryOneByOne(beam.DoFn):
    """RunInference's failed batches -> each element alone through the same model handler.

    Input: the `failed_inferences` of RunInference(...).with_exception_handling(),
    (batch, (exception type, repr, traceback)). Main output: what the
    handler returns for each element that succeeds alone (PredictionResult,
    or (key, PredictionResult) with a KeyedModelHandler); FAILED: (element,
    describe_error(its own exception)) for the ones that fail alone too;
    COUNTS: inference.failed_batches, inference.retried_elements.

    The model is loaded on a worker's first failed batch, not in setup: a
    job where nothing fails never loads this second copy. exc_class: what
    an element's failure may raise (anything else fails the job).
    """

    def __init__(self, handler, exc_class=Exception):
        from apache_beam.utils import shared

        self._handler = handler
        self._exc_class = exc_class
        self._shared = shared.Shared()
        self._model = None
        self._failed = Metrics.counter(NAMESPACE, "inference_failed_batches")
        self._dead = Metrics.counter(NAMESPACE, f"dead_letter.{INFERENCE_ERROR}")

    def process(self, failed):
        batch, error = failed
        batch = list(batch)
        _LOG.warning("inference failed on a batch of %d (%s); retrying its elements one by one", len(batch),
                     _batch_error(error))
        self._failed.inc()
        yield T.tagged_count("inference.failed_batches")
        yield T.tagged_count("inference.retried_elements", len(batch))
        if self._model is None:
            self._model = self._shared.acquire(self._handler.load_model, tag="retry-one-by-one")
        for element in batch:
            try:
                results = list(self._handler.run_inference([element], self._model))
            except self._exc_class as err:  # the element's own failure: dead-lettered by the caller
                self._dead.inc()
                yield pvalue.TaggedOutput(FAILED, (element, describe_error(err)))
                continue
            yield from results


class RunInferenceRetrying(beam.PTransform):
    """RunInference(handler) where a failing batch costs only its failing elements.

    PCollection[example] -> {"results": what RunInference returns,
    FAILED: (example, error text) of the examples that fail even alone,
    T.COUNTS: inference.failed_batches, inference.retried_elements}.

    Beam's RunInference has no per-element fallback: with exception
    handling, a batch whose inference raises goes whole to
    `failed_inferences`. RetryOneByOne re-runs each of its elements alone
    with the same handler (keyed or not), so the good ones are still scored.
    """

    def __init__(self, handler, exc_class=Exception):
        """handler: a ModelHandler (keyed or not); exc_class: the exception class(es) that mark a
        failed inference (RunInference.with_exception_handling's; anything else fails the job)."""
        super().__init__()
        self._handler = handler
        self._exc_class = exc_class

    def expand(self, examples):
        results, dlq = examples | "RunInference" >> RunInference(self._handler).with_exception_handling(
            exc_class=self._exc_class)
        retry = RetryOneByOne(self._handler, self._exc_class)
        retried = dlq.failed_inferences | "RetryOneByOne" >> beam.ParDo(retry).with_outputs(
            FAILED, T.COUNTS, main="results")
        merged = (results, retried.results) | "MergeResults" >> beam.Flatten()
        return {"results": merged, FAILED: retried[FAILED], T.COUNTS: retried[T.COUNTS]}


def inference_dead_letter(query, error: str, where: str = "") -> records.DeadLetter:
    """The dead letter of a user the model rejects: source MODEL_SOURCE, reason INFERENCE_ERROR.

    query: a user_queries.UserQuery. raw holds the query (ASCII-escaped
    JSON: the text the model refused may not be valid UTF-8 on its own);
    where (e.g. " (previous window)") is appended to the location.
    """
    raw = json.dumps({"user_id": query.user_id, "user_text": query.user_text,
                      "history_item_ids": list(query.history_item_ids)}, sort_keys=True, ensure_ascii=True)
    return records.DeadLetter(MODEL_SOURCE, f"user {query.user_id}{where}", INFERENCE_ERROR,
                              f"the model rejected this user's query even alone: {error}", raw)


def check_not_all_rejected(queries: int, scored: int, dead_letter_dir: str) -> None:
    """Every query failing inference is the model's or the job's fault, not the users': an error.

    (One bad user is dead-lettered and the job succeeds; all of them is
    e.g. a model that does not take these inputs.)
    """
    if queries and not scored:
        raise records.InputError(
            f"the model rejected all {queries:,} user queries (reason {INFERENCE_ERROR}; the errors are in "
            f"{dead_letter_dir}): check that --model-dir is a segrec export matching this input")
