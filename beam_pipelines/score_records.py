"""`segrec score`'s output: one recommendation record per scored user, and where it is written.

    (UserQuery, serving_default / serving_exclude outputs) --ToRecord--> {user_id, segment_id, segment_label,
                                                        items, scores, model_version}
    records --WriteRecords--> recommendations-*.jsonl / recommendations-*.parquet / a BigQuery table

The field names are the Parquet and BigQuery schemas (`parquet_schema`,
`bigquery_schema`); `bigquery_row` makes a record a row of JSON types only.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipelines.sources import records
from trainer import features

NAMESPACE = "segrec.score"
_LOG = logging.getLogger(NAMESPACE)
PROGRESS_EVERY = 1_000

JSONL = "jsonl"
PARQUET = "parquet"
FORMATS = (JSONL, PARQUET)
RECORDS_PREFIX = "recommendations"

# Output record fields (also the Parquet and BigQuery schemas).
USER_ID = features.USER_ID
SEGMENT_ID = features.SEGMENT_ID
SEGMENT_LABEL = "segment_label"
ITEMS = "items"
SCORES = "scores"
MODEL_VERSION = "model_version"


class ToRecord(beam.DoFn):
    """(UserQuery, serving_default outputs) -> the output record (a dict).

    labels: segment id -> label (the export's segments.json; may be empty);
    model_version: the export's version number.
    """

    def __init__(self, labels: tuple, model_version: int):
        self._labels = tuple(labels)
        self._version = model_version
        self._scored = Metrics.counter(NAMESPACE, "users_scored")
        self._n = 0

    def process(self, element):
        query, out = element
        yield to_record(query, out, self._labels, self._version)
        self._scored.inc()
        self._n += 1
        if self._n % PROGRESS_EVERY == 0:
            _LOG.info("scored %d users on this worker", self._n)


def to_record(query, out: dict, labels: tuple, model_version: int) -> dict:
    """One user's output record (query: a UserQuery); "" / -inf slots (catalog smaller than k) are dropped."""
    ids = [str(i) for i in out[features.OUT_ITEM_IDS]]
    scores = [float(s) for s in out[features.OUT_SCORES]]
    keep = [j for j, i in enumerate(ids) if i != features.PAD_ITEM_ID]
    segment = int(out[features.SEGMENT_ID])
    return {
        USER_ID: query.user_id,
        SEGMENT_ID: segment,
        SEGMENT_LABEL: labels[segment] if 0 <= segment < len(labels) else None,
        ITEMS: [ids[j] for j in keep],
        SCORES: [scores[j] for j in keep],
        MODEL_VERSION: model_version,
    }


def parquet_schema():
    import pyarrow as pa

    return pa.schema([
        (USER_ID, pa.string()), (SEGMENT_ID, pa.int32()), (SEGMENT_LABEL, pa.string()),
        (ITEMS, pa.list_(pa.string())), (SCORES, pa.list_(pa.float32())), (MODEL_VERSION, pa.int64()),
    ])


def bigquery_schema() -> dict:
    """The BigQuery table schema of the output records (WriteToBigQuery's dict form)."""
    return {"fields": [
        {"name": USER_ID, "type": "STRING", "mode": "REQUIRED"},
        {"name": SEGMENT_ID, "type": "INTEGER", "mode": "REQUIRED"},
        {"name": SEGMENT_LABEL, "type": "STRING", "mode": "NULLABLE"},
        {"name": ITEMS, "type": "STRING", "mode": "REPEATED"},
        {"name": SCORES, "type": "FLOAT", "mode": "REPEATED"},
        {"name": MODEL_VERSION, "type": "INTEGER", "mode": "REQUIRED"},
    ]}


def bigquery_row(record: dict) -> dict:
    """An output record as a BigQuery row: JSON types only, every schema field present."""
    return {
        USER_ID: str(record[USER_ID]), SEGMENT_ID: int(record[SEGMENT_ID]),
        SEGMENT_LABEL: None if record[SEGMENT_LABEL] is None else str(record[SEGMENT_LABEL]),
        ITEMS: [str(i) for i in record[ITEMS]], SCORES: [float(s) for s in record[SCORES]],
        MODEL_VERSION: int(record[MODEL_VERSION]),
    }


def check_bigquery() -> None:
    """WriteToBigQuery needs apache-beam[gcp]'s clients; fail before the pipeline starts."""
    try:
        import apitools  # noqa: F401
        from google.cloud import bigquery  # noqa: F401
    except ImportError as err:
        raise records.InputError(
            f"--bigquery-table needs Apache Beam's GCP extras ({err}); install them with "
            "`pip install 'segrec[gcp]'` (apache-beam[gcp]) or write --format jsonl/parquet instead"
        ) from None


class WriteRecords(beam.PTransform):
    """Output records -> RECORDS_PREFIX-*.jsonl / -*.parquet under output_dir and/or a BigQuery table.

    formats: a subset of FORMATS. bigquery_table: PROJECT:DATASET.TABLE or
    None; like the file sinks it never adds to an existing result unless
    overwrite (WRITE_TRUNCATE, else WRITE_EMPTY).
    """

    def __init__(self, output_dir: str, formats: tuple, bigquery_table: Optional[str] = None,
                 overwrite: bool = False):
        super().__init__()
        self._prefix = FileSystems.join(output_dir, RECORDS_PREFIX)
        self._formats = tuple(formats)
        self._table = bigquery_table
        self._overwrite = overwrite

    def expand(self, out):
        if JSONL in self._formats:
            (out
             | "RecordJson" >> beam.Map(lambda r: json.dumps(r, ensure_ascii=False, sort_keys=True))
             | "WriteJsonl" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl"))
        if PARQUET in self._formats:
            out | "WriteParquet" >> beam.io.WriteToParquet(self._prefix, parquet_schema(), file_name_suffix=".parquet")
        if self._table:
            from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery

            (out
             | "BigQueryRow" >> beam.Map(bigquery_row)
             | "WriteBigQuery" >> WriteToBigQuery(
                 self._table, schema=bigquery_schema(),
                 create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
                 # Like the file sinks: never add to an existing result unless --overwrite.
                 write_disposition=BigQueryDisposition.WRITE_TRUNCATE if self._overwrite
                 else BigQueryDisposition.WRITE_EMPTY))
        return beam.pvalue.PDone(out.pipeline)
