"""The model: text encoder, towers, segment head, SegRecModel, its run-dir persistence and batched outputs."""
