"""Training: from a dataset dir to a run dir, on a laptop, local GPUs or Vertex AI.

    job           `segrec train`: TrainConfig -> text cache, model, fit, segments, run dir
    fit           the fit loop: warm-up, segment init, joint training, Recall@K callback
    distribution  the cluster and tf.distribute strategy from the environment; output dirs
    vertex        Vertex AI custom jobs (`segrec vertex submit`)
"""
