"""Offline evaluation: is the model worth serving, and against what?

    ranking    full-catalog ranking metrics (Recall@K, NDCG@10, MRR, coverage) on numpy arrays
    baselines  popularity, EASE, the ID-only two-tower: one fit/score interface
    sasrec     SASRec, the strongest common sequential baseline
    selection  every baseline's hyper-parameters chosen on the validation split (the registry)
    evaluate   `segrec evaluate`: every model scored once on the test split, per segment,
               cold users and repeat targets, with what chose each model's configuration
    report     report.md / report.json and figures
"""
