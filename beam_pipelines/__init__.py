"""segrec Beam pipelines: preprocessing, batch scoring, segment refresh.

One line per module; a module imports only modules listed below it (and its own package):

    score                `segrec score`: batch recommendations and segments (driver)
    score_records        score's output record, its Parquet/BigQuery schemas and sinks
    refresh              `segrec segments refresh`: config, plan, pipeline, run (driver)
    refresh_report       refresh's stats, drift figures, new segments.json, drift.md, output files
    refresh_steps        refresh's per-element steps and combiners (assignment, k-means, joins)
    preprocess           `segrec preprocess`: raw logs -> the dataset dir (driver; its stats)
    inference/           the model in a pipeline, shared by score and refresh:
      model_handler        SegRecModelHandler, SignatureCall/batch_inputs, RunSegRec
      retrying             RunInferenceRetrying (one-by-one retry), the model's dead letters
      user_queries         UserQuery; BuildUserQueries (raw logs), QueriesFromDataset (dataset dir)
    transforms           preprocess's steps (ReadSource, dedupe, catalog join, examples), DEAD/COUNTS
    outputs              output-dir helpers (text files, the --overwrite rule, PipelineSummary)
    sources/             raw inputs:
      download             a MovieLens release onto local disk (verified download)
      synthetic            `segrec generate`: a data set with planted segments
      synthetic_catalog    the synthetic data set's word lists and item catalog
      readers              check_source/parse_row per format, generic_sources, infer_format
      movielens            MovieLens layouts (100K parsers and checks, spec builders)
      files                paths, opening, row streaming, decoding, CSV/JSONL/Parquet checks
      source_spec          SourceSpec/make_spec: kind, path, format, column mapping, options
      values               value coercions shared by every format
      records              canonical records, RowError/InputError, DeadLetter
"""

from trainer import _env  # noqa: F401  (must run before tensorflow is imported)
