"""Raw inputs: canonical records, readers (generic, MovieLens), downloads, the synthetic generator."""
