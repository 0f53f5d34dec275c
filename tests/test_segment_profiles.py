"""segments.json profiles: lift-ranked categories, attribute summaries, labels, privacy floor."""

import numpy as np

from trainer import segment_profiles as sp


def make_inputs():
    # Two segments of 30 users: segment 0 buys outdoor boots, segment 1 buys kitchen pans;
    # everybody also buys "milk" (common, so it must not define either segment).
    users = [f"u{i}" for i in range(60)] + ["u_small"]
    labels = np.array([0] * 30 + [1] * 30 + [2])
    hist = {u: (["boots", "milk"] if l == 0 else ["pan", "milk"]) for u, l in zip(users, labels)}
    attrs = {u: {"age": str(25 if l == 0 else 55), "tier": "gold" if l == 0 else "basic", "zip": u} for u, l in zip(users, labels)}
    return sp.ProfileInputs(
        user_ids=users, labels=labels, centroids=np.eye(3, 4, dtype=np.float32), histories=hist, attributes=attrs,
        item_titles={"boots": "Hiking Boots", "pan": "Cast Iron Pan", "milk": "Milk"},
        item_categories={"boots": ("outdoor",), "pan": ("kitchen",), "milk": ("grocery",)},
        probs=np.full((61, 3), 1 / 3, dtype=np.float32))


def test_profiles_describe_what_sets_each_segment_apart(tmp_path):
    doc = sp.build_profiles(make_inputs(), min_profile_size=20, quality={"silhouette": 0.5})
    s0, s1, s2 = doc["segments"]
    assert (s0["size"], s1["size"], s2["size"]) == (30, 30, 1)
    assert s0["top_categories"][0]["category"] == "outdoor"
    assert s1["top_categories"][0]["category"] == "kitchen"
    assert s0["top_items"][0]["title"] == "Hiking Boots"
    assert s0["attributes"]["age"]["mean"] == 25.0 and s0["attributes"]["tier"] == {"gold": 1.0}
    assert "zip" not in s0["attributes"]  # unique per user: not summarised
    assert s0["label"] == "outdoor + grocery · age≈25 · gold"
    # Below the privacy floor: size only, no profile.
    assert s2["profiled"] is False and "top_items" not in s2 and "attributes" not in s2
    path = str(tmp_path / "segments.json")
    sp.save(doc, path)
    back = sp.load(path)
    assert back["quality"] == {"silhouette": 0.5}
    np.testing.assert_allclose(sp.centroids_of(back), np.eye(3, 4))
    assert sp.labels_of(back)[1].startswith("kitchen")
