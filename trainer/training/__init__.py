"""Training: the `segrec train` job, the fit loop, distribution, Vertex AI submission."""
