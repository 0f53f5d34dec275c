"""`segrec export`: from a run dir to a servable SavedModel version.

    layout      <base>/segrec/<version>/: versions, resolve, export.json, load_exported
    index       retrieval indexes over item embeddings (ScaNN, brute force), recall tuning
    signatures  ServingModule: the SavedModel's signatures over the model and the index
    exporter    the export job: build, tune, gate, save, verify, warm-up records, publish
    quantize    --encoder-precision: float16 / int8 encoder copies, the overlap check vs float32
    graph_ops   the non-core ops a server needs, read from the SavedModel, checked per --target
    card        export.json's fields, model_card.md, the CLI summary
"""
