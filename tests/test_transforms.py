"""Each preprocessing DoFn/PTransform on its own, with TestPipeline + assert_that."""

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines import transforms as T
from beam_pipelines.sources import readers, records
from trainer import features as F
from trainer.data import examples as ex

I = records.Interaction


def item(item_id, title="T", loc="items.csv:2"):
    return records.Item(item_id, title, ("c1",), "", loc)


def test_read_and_parse_routes_bad_rows_and_counts_reads(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i1,100\nu2,i2,notanumber\nu3,,300\n")
    spec = readers.generic_sources(str(path), str(path))[0]
    with TestPipeline() as p:
        out = p | beam.Create([spec]) | beam.ParDo(T.ReadAndParse()).with_outputs(T.DEAD, T.COUNTS, main="records")
        assert_that(out.records | beam.Map(lambda r: (r.user_id, r.item_id, r.timestamp)),
                    equal_to([("u1", "i1", 100)]), label="good")
        assert_that(out[T.DEAD] | beam.Map(lambda d: (d.reason, d.location.rsplit(":", 1)[1])),
                    equal_to([(records.BAD_TIMESTAMP, "3"), (records.MISSING_FIELD, "4")]), label="dead")
        assert_that(out[T.COUNTS], equal_to([("read.interactions", 3)]), label="counts")


def test_dedupe_by_id_keeps_the_first_by_location_numerically():
    rows = [item("i1", "second", "f.csv:10"), item("i1", "first", "f.csv:9"), item("i2", "only", "f.csv:3")]
    with TestPipeline() as p:
        out = p | beam.Create(rows) | T.DedupeById(records.ITEMS, "item_id")
        assert_that(out.records | beam.Map(lambda r: (r.item_id, r.title)),
                    equal_to([("i1", "first"), ("i2", "only")]), label="kept")
        assert_that(out[T.DEAD] | beam.Map(lambda d: (d.reason, d.location)),
                    equal_to([(records.DUPLICATE_ID, "f.csv:10")]), label="dead")


def test_attach_tags_adds_most_frequent_tags_and_dead_letters_unknown_items():
    grouped = [
        ("i1", {"items": [item("i1")], "tags": [records.ItemTag("i1", t, f"tags.csv:{n}") for n, t in
                                                 enumerate(["funny", "Funny", "dark", "noir"], 2)]}),
        ("i9", {"items": [], "tags": [records.ItemTag("i9", "x", "tags.csv:9")]}),
    ]
    with TestPipeline() as p:
        out = p | beam.Create(grouped) | beam.ParDo(T.AttachTags(max_tags=2)).with_outputs(T.DEAD, T.COUNTS, main="items")
        assert_that(out.items | beam.Map(lambda r: r.description), equal_to(["tags: funny, dark"]), label="desc")
        assert_that(out[T.DEAD] | beam.Map(lambda d: d.reason), equal_to([records.UNKNOWN_ITEM]), label="dead")
        assert_that(out[T.COUNTS], equal_to([("accepted.tags", 4)]), label="counts")


def test_join_catalog_unknown_items_duplicates_ratings_and_item_minimum():
    grouped = [
        # Known item: a duplicate (u1, 10) and a low rating are filtered.
        ("i1", {"items": [item("i1")], "interactions": [
            I("u1", "i1", 10, rating=5.0, location="x:2"), I("u1", "i1", 10, rating=5.0, location="x:3"),
            I("u2", "i1", 20, rating=1.0, location="x:4"), I("u3", "i1", 30, rating=4.0, location="x:5")]}),
        # Unknown item: dead-lettered.
        ("i9", {"items": [], "interactions": [I("u1", "i9", 10, location="x:6")]}),
        # Only one interaction: under the item minimum of 2.
        ("i2", {"items": [item("i2")], "interactions": [I("u1", "i2", 40, rating=5.0, location="x:7")]}),
    ]
    with TestPipeline() as p:
        out = p | beam.Create(grouped) | beam.ParDo(T.JoinCatalog(min_rating=3.0, min_item_interactions=2)).with_outputs(
            T.DEAD, T.COUNTS, T.CATALOG, main="interactions")
        assert_that(out.interactions | beam.Map(lambda kv: (kv[0], kv[1].location)),
                    equal_to([("u1", "x:2"), ("u3", "x:5")]), label="kept")
        assert_that(out[T.CATALOG] | beam.Map(lambda r: r.item_id), equal_to(["i1"]), label="catalog")
        assert_that(out[T.DEAD] | beam.Map(lambda d: (d.reason, d.location)),
                    equal_to([(records.UNKNOWN_ITEM, "x:6")]), label="dead")
        assert_that(out[T.COUNTS] | beam.CombinePerKey(sum), equal_to([
            ("filtered.duplicate", 1), ("filtered.below_min_rating", 1),
            ("filtered.item_min_interactions", 1), ("filtered_items.min_interactions", 1)]), label="counts")


def test_build_examples_uses_titles_and_profile_and_applies_user_minimum():
    grouped = [
        ("u1", {"interactions": [I("u1", "i1", 10), I("u1", "i2", 20), I("u1", "i3", 30)],
                "users": [records.User("u1", (("age", "30"),))]}),
        ("u2", {"interactions": [I("u2", "i1", 10)], "users": []}),  # under the minimum of 2
        ("u3", {"interactions": [], "users": [records.User("u3", ())]}),  # profile only
    ]
    titles = {"i1": "One", "i2": "Two", "i3": "Three"}
    with TestPipeline() as p:
        titles_pc = p | "Titles" >> beam.Create(list(titles.items()))
        out = p | beam.Create(grouped) | beam.ParDo(
            T.BuildExamples(ex.ExamplePolicy(text_history=5), min_user_interactions=2), titles=beam.pvalue.AsDict(titles_pc)
        ).with_outputs(T.TRAIN, T.VALID, T.EVAL, T.EVENTS, T.COUNTS)
        assert_that(out[T.TRAIN] | beam.Map(lambda e: (e[F.ITEM_ID], tuple(e[F.HISTORY_ITEM_IDS]))),
                    equal_to([("i1", ())]), label="train")
        assert_that(out[T.VALID] | beam.Map(lambda e: (e[F.ITEM_ID], tuple(e[F.HISTORY_ITEM_IDS]))),
                    equal_to([("i2", ("i1",))]), label="valid")
        # The test query sees the training and validation periods.
        assert_that(out[T.EVAL] | beam.Map(lambda e: (e[F.ITEM_ID], e[F.USER_TEXT])),
                    equal_to([("i3", "user: age 30. recent: Two; One.")]), label="eval")
        assert_that(out[T.EVENTS] | beam.Map(lambda r: (r[F.USER_ID], tuple(r[F.EVENT_ITEM_IDS]),
                                                         tuple(r[F.EVENT_SPLITS]))),
                    equal_to([("u1", ("i1", "i2"), ("train", "valid"))]), label="events")
        assert_that(out[T.COUNTS] | beam.CombinePerKey(sum), equal_to([
            ("accepted.interactions", 3), ("users_with_examples", 1), ("filtered.user_min_interactions", 1),
            ("events.train", 1), ("events.valid", 1)]),
            label="counts")


def test_sorted_vocab_orders_by_count_then_token():
    with TestPipeline() as p:
        pairs = p | beam.Create([("b", 2), ("a", 2), ("c", 5), ("d", 0)])
        assert_that(pairs | "plain" >> T.SortedVocab(), equal_to(["c\na\nb\nd"]), label="plain")
        assert_that(pairs | "tsv" >> T.SortedVocab(with_counts=True), equal_to(["c\t5\na\t2\nb\t2\nd\t0"]), label="tsv")


def test_location_key_sorts_lines_numerically():
    assert sorted(["f:10", "f:9", "f:row 2"], key=T.location_key) == ["f:row 2", "f:9", "f:10"]
