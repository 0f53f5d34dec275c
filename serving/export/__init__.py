"""`segrec export`: from a run dir to a servable SavedModel version.

    layout      <base>/segrec/<version>/: versions, resolve, export.json, load_exported
    index       retrieval indexes over item embeddings (ScaNN, brute force), recall tuning
    signatures  ServingModule: the SavedModel's signatures over the model and the index
    exporter    the export job: build, tune, save, verify, warm-up records, model card, publish
"""
