"""Raw inputs: records, source specs, file plumbing, readers (generic, MovieLens), downloads, synthetic data.

See the module map in beam_pipelines' docstring (readers > movielens > files > source_spec > values > records).
"""
