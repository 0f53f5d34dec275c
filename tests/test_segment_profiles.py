"""segments.json profiles: lift-ranked categories, attribute summaries, labels, privacy floor."""

import numpy as np

from trainer.segments import document as segments_doc
from trainer.segments import profiles as sp


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
    # Everybody buys milk: "grocery" (lift 1.0) is no part of the label. Ages 25 x30 vs 55 x31: overall mean
    # 2455/61 = 40.25, std 15.0, d = -1.017 (ranks as lift 4**1.017 = 4.1), above gold (1.0 / (30/61) = 2.03).
    assert s0["label"] == "outdoor · age≈25 · gold"
    assert s0["distinctive_attributes"]["tier"] == {
        "most_common": {"value": "gold", "share": 1.0},
        "over_represented": {"value": "gold", "count": 30, "share": 1.0, "overall_share": 0.492, "lift": 2.033}}
    assert s0["distinctive_attributes"]["age"] == {"mean": 25.0, "overall_mean": 40.25, "effect_size": -1.017}
    # Below the privacy floor: size only, no profile.
    assert s2["profiled"] is False and "top_items" not in s2 and "attributes" not in s2
    path = str(tmp_path / "segments.json")
    segments_doc.save(doc, path)
    back = segments_doc.load(path)
    assert back["quality"] == {"silhouette": 0.5}
    np.testing.assert_allclose(segments_doc.centroids(back), np.eye(3, 4))
    assert segments_doc.label_list(back)[1].startswith("kitchen")


def _occupations():
    # Three segments of 40; "student" is half of every segment (and of everybody), so the most common value
    # is the same everywhere. What differs is the over-represented value: 12 retired in segment 0 (plus 2 in
    # segment 1), 12 programmers in 1, 12 artists in 2. Two astronauts in segment 0 have the highest lift
    # there ((2/40) / (2/120) = 3.0 > retired (12/40) / (14/120) = 2.57) but too little support.
    mix = ({"student": 20, "retired": 12, "astronaut": 2, "other": 6},
           {"student": 20, "programmer": 12, "retired": 2, "other": 6},
           {"student": 20, "artist": 12, "other": 8})
    users, labels, attrs = [], [], {}
    for seg, counts in enumerate(mix):
        for value, n in counts.items():
            for _ in range(n):
                uid = f"u{len(users)}"
                users.append(uid)
                labels.append(seg)
                # Same ages and the same tastes everywhere: only occupation can set a segment apart.
                attrs[uid] = {"occupation": value, "age": str(20 + 10 * (len(users) % 4))}
    return sp.ProfileInputs(
        user_ids=users, labels=np.array(labels), centroids=np.eye(3, 4, dtype=np.float32),
        histories={u: ["film"] for u in users}, attributes=attrs, item_titles={"film": "Film"},
        item_categories={"film": ("Drama",)})


def test_summaries_and_labels_name_the_over_represented_value_not_the_most_common():
    doc = sp.build_profiles(_occupations(), min_profile_size=20)
    s0, s1, s2 = doc["segments"]
    for s in (s0, s1, s2):
        assert next(iter(s["attributes"]["occupation"])) == "student"  # the old summary is kept as it was
        assert s["distinctive_attributes"]["occupation"]["most_common"] == {"value": "student", "share": 0.5}
        assert "student" not in s["label"] and "Drama" not in s["label"]  # lift 1.0: nothing distinctive
        assert "age" not in s["label"]  # same ages in every segment
    assert s0["distinctive_attributes"]["occupation"]["over_represented"] == {
        "value": "retired", "count": 12, "share": 0.3, "overall_share": 0.117, "lift": 2.571}
    assert s1["distinctive_attributes"]["occupation"]["over_represented"]["value"] == "programmer"
    assert s2["distinctive_attributes"]["occupation"]["over_represented"]["value"] == "artist"
    # A minority value carries its lift so the label does not claim every member is retired.
    assert [s["label"] for s in (s0, s1, s2)] == ["retired ×2.6", "programmer ×3.0", "artist ×3.0"]
    # The support floor is what keeps the two astronauts out.
    loose = sp.build_profiles(_occupations(), min_profile_size=20, min_attribute_support=1)
    assert loose["segments"][0]["distinctive_attributes"]["occupation"]["over_represented"]["value"] == "astronaut"


def test_colliding_labels_take_the_next_feature_then_an_id():
    # Segments 0 and 1 both buy boots (outdoor) and dumbbells (fitness), lift 2.0 each; 0 also reads (books),
    # 1 listens (music), lift 1.33: their base labels collide and the third category tells them apart.
    # Segments 2 and 3 are identical: nothing tells them apart, so "#id". Segment 4: one user, not profiled.
    groups = (["boots", "dumbbell", "novel"], ["boots", "dumbbell", "cd"], ["pan", "novel", "cd"],
              ["pan", "novel", "cd"], ["pan"])
    sizes = (30, 30, 30, 30, 1)
    users, labels, hist = [], [], {}
    for seg, (items, n) in enumerate(zip(groups, sizes)):
        for _ in range(n):
            users.append(f"u{len(users)}")
            labels.append(seg)
            hist[users[-1]] = items
    cats = {"boots": ("outdoor",), "dumbbell": ("fitness",), "novel": ("books",), "cd": ("music",),
            "pan": ("kitchen",)}
    inputs = sp.ProfileInputs(user_ids=users, labels=np.array(labels), centroids=np.zeros((5, 2)), histories=hist,
                              attributes={u: {"tier": "basic"} for u in users}, item_titles={},
                              item_categories=cats)
    labels_out = segments_doc.label_list(sp.build_profiles(inputs, min_profile_size=20))
    assert labels_out == ["fitness + outdoor + books", "fitness + outdoor + music", "kitchen + books + music #2",
                          "kitchen + books + music #3", "segment 4 (too small to profile)"]
    assert len(set(labels_out)) == len(labels_out)


def test_unique_labels_avoid_fixed_labels_and_cap_extra_features():
    parts = {0: sp.LabelParts(["a"], [], [("attribute", "x"), ("attribute", "y"), ("attribute", "z")]),
             1: sp.LabelParts(["a"], [], [("attribute", "x"), ("attribute", "y"), ("attribute", "w")]),
             2: sp.LabelParts(["b"], [], [("category", "c")])}
    # 0 and 1 share their first two spare features; the third would differ but is past the cap.
    assert sp.unique_labels(parts) == {0: "a · x · y #0", 1: "a · x · y #1", 2: "b"}
    # A label already taken (a fixed one) makes the profiled segment take its next feature.
    assert sp.unique_labels({2: parts[2]}, {5: "b"}) == {2: "b + c"}
    assert parts[0].attributes == []  # the caller's parts are not modified


def test_attribute_kind_is_decided_on_the_whole_population():
    # Zip codes: all digits inside segment 0, not in segment 1 ("T8H1N"-style). Near-unique over everybody,
    # so neither segment summarises them (before, segment 0 got a numeric zip "mean").
    users = [f"u{i}" for i in range(60)]
    attrs = {u: {"zip": f"{10000 + i}" if i < 30 else f"T{i}H1N", "age": str(30 + i % 3)} for i, u in enumerate(users)}
    inputs = sp.ProfileInputs(user_ids=users, labels=np.array([0] * 30 + [1] * 30), centroids=np.zeros((2, 2)),
                              histories={}, attributes=attrs, item_titles={}, item_categories={})
    doc = sp.build_profiles(inputs, min_profile_size=20)
    for s in doc["segments"]:
        assert set(s["attributes"]) == {"age"} and set(s["distinctive_attributes"]) == {"age"}
        assert s["label"].startswith("mixed")


def test_drop_profile_leaves_nothing_of_the_profile():
    seg = sp.build_profiles(make_inputs(), min_profile_size=20)["segments"][0]
    assert set(sp.PROFILE_KEYS) <= set(seg)
    sp.drop_profile(seg)
    assert set(seg) == {"id", "size", "share", "centroid", "profiled", "label"}
    assert seg["label"] == "segment 0 (too small to profile)" and seg["profiled"] is False
