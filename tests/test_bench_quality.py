"""bench_quality's target table: which rows each target compares (pure function, no training)."""

from bench import bench_quality as bq


def _row(ndcg, sparse_ndcg=None, r10=0.1, r50=0.4):
    cold = {} if sparse_ndcg is None else {bq.SPARSE.format(n=5): {"segrec": {"ndcg@10": sparse_ndcg}}}
    return {"models": {"segrec": {"ndcg@10": ndcg, "recall@10": r10, "recall@50": r50}}, "cold_start": cold,
            "beta": 0.0}


def test_segments_on_is_the_segment_prior_row_against_the_beta0_row():
    main = _row(0.10, 0.05)
    m = {"models": {"segrec": main["models"]["segrec"], "sasrec": {"ndcg@10": 0.11, "recall@10": 0.09},
                    "ease": {"recall@50": 0.30}},
         "cold_start": main["cold_start"],
         "ablations": {"full model": main, bq.SEGMENTS_OFF: main, bq.SEGMENTS_ON: _row(0.09, 0.06)}}
    t = bq.ml100k_targets(m)
    on_off = t["segments on (segment prior) > off: NDCG@10"]
    assert (on_off["value"], on_off["baseline"], on_off["met"]) == (0.09, 0.10, False)
    sparse = t["segments on (segment prior) > off: NDCG@10, users cut to 5 items"]
    assert (sparse["value"], sparse["baseline"], sparse["met"]) == (0.06, 0.05, True)
    assert t["NDCG@10 >= SASRec"]["met"] is False and t["Recall@10 >= SASRec"]["met"] is True
    assert t["Recall@50 >= 1.10x EASE"] == {"value": 0.4, "baseline": 0.30, "ratio": 1.333, "met": True}


def test_no_segment_rows_no_segment_targets():
    m = {"models": {"segrec": _row(0.1)["models"]["segrec"]}, "ablations": {"full model": _row(0.1)}}
    assert not any(k.startswith("segments on") for k in bq.ml100k_targets(m))


def test_every_ablation_key_is_a_valid_train_override():
    from trainer.training import job

    for key, (name, overrides, beta) in bq.ABLATIONS.items():
        job.TrainConfig(dataset_dir="d", output_dir="o", **overrides)  # validates each override
        assert name and (beta is None or beta >= 0), key
    assert job.TrainConfig(dataset_dir="d", output_dir="o").item_prior == "global"
    assert bq.ABLATIONS["segment_prior"][1] == {"item_prior": "segment"}
