"""Offline evaluation: is the model worth serving, and against what?

    ranking    full-catalog ranking metrics (Recall@K, NDCG@10, MRR, coverage) on numpy arrays
    baselines  popularity, EASE, the ID-only two-tower: one fit/score interface
    sasrec     SASRec, the strongest common sequential baseline
    evaluate   `segrec evaluate`: every model on the same split, per segment and cold users
    report     report.md / report.json and figures
"""
