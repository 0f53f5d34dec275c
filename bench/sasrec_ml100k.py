"""SASRec on MovieLens 100K, temporal leave-one-out, full-catalog ranking.

    python -m bench.sasrec_ml100k [--ml100k DIR] [--max-epochs 200] [--dropout 0.2] ...

Split: every rating is an implicit interaction (no rating filter); each
user's events are sorted by (timestamp, file order); test = the last item,
validation = the one before, train = the rest. SASRec is trained on train
with the epoch chosen on validation (training items excluded); test is then
scored with history = train + validation, ranking the full catalog with every
item the user consumed in train + validation excluded (pessimistic ties, via
trainer.evaluation.ranking). Prints validation and test Recall@10/@50, NDCG@10 and the
wall time. Reference (a plain SASRec on this split): test Recall@10 ≈ 0.199,
Recall@50 ≈ 0.491, NDCG@10 ≈ 0.107.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np

import trainer  # noqa: F401
from bench import machine
from trainer.evaluation import ranking as metrics
from trainer.evaluation.sasrec import SASRecBaseline

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_ml100k() -> str:
    """$SEGREC_ML100K_DIR, else shared/data/ml-100k beside the checkout (or beside a worktree's parent)."""
    if os.environ.get("SEGREC_ML100K_DIR"):
        return os.environ["SEGREC_ML100K_DIR"]
    candidates = [os.path.join(base, "shared", "data", "ml-100k")
                  for base in (os.path.dirname(_REPO), os.path.dirname(os.path.dirname(_REPO)))]
    return next((c for c in candidates if os.path.exists(os.path.join(c, "u.data"))), candidates[0])


def load_split(ml100k_dir: str) -> dict:
    """u.data -> integer-indexed train / validation / test (leave-last-one-out per user)."""
    raw = np.loadtxt(os.path.join(ml100k_dir, "u.data"), dtype=np.int64)  # [R, 4] user item rating ts
    _, user = np.unique(raw[:, 0], return_inverse=True)
    _, item = np.unique(raw[:, 1], return_inverse=True)
    ts = raw[:, 3]
    order = np.lexsort((np.arange(raw.shape[0]), ts, user))  # per user by (timestamp, file order)
    user, item, ts = user[order], item[order], ts[order]
    n_users, n_items = int(user.max()) + 1, int(item.max()) + 1
    counts = np.bincount(user, minlength=n_users)
    if counts.min() < 3:
        raise ValueError("every user needs >= 3 interactions for train / validation / test")
    end = np.cumsum(counts)  # index after each user's last event
    is_test = np.zeros(user.size, bool)
    is_valid = np.zeros(user.size, bool)
    is_test[end - 1] = True
    is_valid[end - 2] = True
    train = ~(is_test | is_valid)
    return {
        "n_users": n_users, "n_items": n_items,
        "train": (user[train], item[train], ts[train]),
        "valid": (user[is_valid], item[is_valid], ts[is_valid]),
        "test": (user[is_test], item[is_test], ts[is_test]),
    }


def _evaluate(model, users, targets, exclude) -> dict:
    result = metrics.rank_targets(lambda q: model.score(users[q]), users.size, targets, exclude)
    return metrics.summarize(result, ks=(10, 50))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ml100k", default=None, help="directory of u.data (default: $SEGREC_ML100K_DIR or shared/)")
    defaults = SASRecBaseline().get_config()
    for key, value in defaults.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    t0 = time.time()
    split = load_split(args.ml100k or default_ml100k())
    n_users, n_items = split["n_users"], split["n_items"]
    (tu, ti, tts), (vu, vi, vts), (su, si, _) = split["train"], split["valid"], split["test"]
    config = {k: getattr(args, k) for k in defaults}
    model = SASRecBaseline(**config).fit(tu, ti, n_items, n_users, timestamps=tts,
                                          valid_user_idx=vu, valid_item_idx=vi)
    train_s = time.time() - t0

    train_seqs = [ti[tu == u] for u in range(n_users)]
    valid = _evaluate(model, vu, vi, [train_seqs[u] for u in vu])
    # Test: history = train + validation item; exclude everything consumed before the test item.
    model.set_history(np.r_[tu, vu], np.r_[ti, vi], timestamps=np.r_[tts, vts], n_users=n_users)
    seen = {u: np.r_[train_seqs[u], vi[vu == u]] for u in range(n_users)}
    test = _evaluate(model, su, si, [seen[u] for u in su])
    wall_s = time.time() - t0

    out = {"config": config, "selection": model.selection_, "validation": valid, "test": test,
           "train_s": round(train_s, 1), "wall_s": round(wall_s, 1), "machine": machine.describe(),
           "data": {"users": n_users, "items": n_items, "train": int(tu.size)}}
    sel = model.selection_
    print(f"chosen on validation {sel['metric']}: epoch {sel['best_epoch']} of {sel['epochs_run']} run")
    for name, m in (("validation", valid), ("test", test)):
        print(f"{name:10s} recall@10 {m['recall@10']:.4f}  recall@50 {m['recall@50']:.4f}  "
              f"ndcg@10 {m['ndcg@10']:.4f}  (n={m['count']})")
    print(f"wall time {wall_s:.0f} s (training {train_s:.0f} s); {machine.markdown(out['machine'])}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, default=float)
    return out


if __name__ == "__main__":
    main()
