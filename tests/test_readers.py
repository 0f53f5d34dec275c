"""Tests for beam_pipelines.sources.readers (with source_spec, files and movielens): files -> records or RowError."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from beam_pipelines.sources import files, movielens, readers, records, source_spec

DATA = pathlib.Path(__file__).parent / "data"
BAD_ROWS = DATA / "bad_rows"
# Only tests read environment variables (STYLE.md rule 3).
ML100K_DIR = os.environ.get("SEGREC_ML100K_DIR", "/work/shared/data/ml-100k")


def _parse_all(spec: source_spec.SourceSpec) -> dict:
    """location -> record or the RowError's reason, for every row of every file."""
    out = {}
    for path in files.expand_paths(spec):
        for row in files.iter_raw_rows(spec, path):
            try:
                out[row.location] = readers.parse_row(spec, row)
            except records.RowError as e:
                out[row.location] = e.reason
    return out


def _records(spec: source_spec.SourceSpec) -> list:
    return [readers.parse_row(spec, r) for p in files.expand_paths(spec) for r in files.iter_raw_rows(spec, p)]


def _write(path: pathlib.Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _strip_location(record):
    return type(record)(**{**record.__dict__, "location": ""})


# --------------------------------------------------------------------------- MovieLens 100K


@pytest.fixture(scope="module")
def ml100k_specs():
    if not os.path.isfile(os.path.join(ML100K_DIR, "u.data")):
        pytest.skip(f"MovieLens 100K not found at {ML100K_DIR}; set SEGREC_ML100K_DIR")
    return {s.kind: s for s in movielens.movielens_100k_sources(ML100K_DIR)}


def test_ml100k_every_row_parses(ml100k_specs):
    counts = {}
    for kind, spec in ml100k_specs.items():
        readers.check_source(spec)
        recs = _records(spec)  # raises on the first RowError: zero errors allowed
        counts[kind] = len(recs)
    assert counts == {records.INTERACTIONS: 100000, records.ITEMS: 1682, records.USERS: 943}


def test_ml100k_first_rows(ml100k_specs):
    items = {i.item_id: i for i in _records(ml100k_specs[records.ITEMS])}
    toy_story = items["1"]
    assert toy_story.title == "Toy Story (1995)"
    assert toy_story.categories == ("Animation", "Children's", "Comedy")
    assert toy_story.description == "released 01-Jan-1995"
    assert toy_story.location == os.path.join(ML100K_DIR, "u.item") + ":1"
    assert items["267"].description == ""  # the one item without a release date

    first = next(files.iter_raw_rows(ml100k_specs[records.INTERACTIONS], ml100k_specs[records.INTERACTIONS].path))
    assert readers.parse_row(ml100k_specs[records.INTERACTIONS], first) == records.Interaction(
        "196", "242", 881250949, weight=1.0, rating=3.0, location=first.location
    )
    user = _records(ml100k_specs[records.USERS])[0]
    assert user.attribute_dict() == {"age": "24", "gender": "M", "occupation": "technician", "zip": "85711"}


def test_ml100k_bad_lines(tmp_path):
    (tmp_path / "u.genre").write_bytes(b"unknown|0\nAction|1\n\n")
    (tmp_path / "u.data").write_bytes(b"1\t2\t5\t881250949\n1\t2\tx\t881250949\n1\t2\t5\n1\t2\t5\t12345678901\n")
    (tmp_path / "u.item").write_bytes(b"7|Caf\xe9 (1995)|01-Jan-1995||url|0|1\n8|Bad|||url|0|2\n")
    (tmp_path / "u.user").write_bytes(b"1|24|M|technician|85711\n")
    specs = {s.kind: s for s in movielens.movielens_100k_sources(str(tmp_path))}
    assert list(_parse_all(specs[records.INTERACTIONS]).values())[1:] == [
        records.BAD_NUMBER, records.MALFORMED_ROW, records.BAD_TIMESTAMP,
    ]
    cafe, bad = _parse_all(specs[records.ITEMS]).values()
    assert (cafe.title, cafe.categories) == ("Café (1995)", ("Action",))  # latin-1 decoding
    assert bad == records.BAD_NUMBER


def test_ml100k_check_source_wrong_file(tmp_path):
    (tmp_path / "u.genre").write_bytes(b"unknown|0\n")
    (tmp_path / "u.data").write_bytes(b"1|2|5|881250949\n")  # "|" instead of tabs
    spec = movielens.movielens_100k_sources(str(tmp_path))[0]
    with pytest.raises(records.InputError, match=r"u\.data.*expected 4"):
        readers.check_source(spec)


def test_ml100k_missing_genre_file(tmp_path):
    with pytest.raises(records.InputError, match="u.genre"):
        movielens.movielens_100k_sources(str(tmp_path))


# --------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize("kind,name", [
    (records.INTERACTIONS, "interactions.csv"), (records.ITEMS, "items.csv"), (records.USERS, "users.csv"),
])
def test_bad_rows_fixture(kind, name):
    expected = json.loads((BAD_ROWS / "expected.json").read_text())[name]
    expected.pop("pipeline")
    path = str(BAD_ROWS / name)
    spec = source_spec.make_spec(kind, path, "csv")
    readers.check_source(spec)
    got = _parse_all(spec)
    assert sorted(got) == sorted(f"{path}:{line}" for line in expected)
    for line, outcome in expected.items():
        result = got[f"{path}:{line}"]
        if outcome == "ok":
            assert not isinstance(result, str), f"{name}:{line} should parse, got {result}"
            assert result.location == f"{path}:{line}"
        else:
            assert result == outcome, f"{name}:{line}"
    # Every reason the readers own appears at least once across the fixtures.
    assert records.BAD_ENCODING in got.values()


def test_bad_rows_fixture_holds_invalid_utf8():
    # Guards against an editor "fixing" the committed bytes.
    for name in ("interactions.csv", "items.csv", "users.csv"):
        with pytest.raises(UnicodeDecodeError):
            (BAD_ROWS / name).read_bytes().decode("utf-8")


def test_bad_rows_values():
    path = str(BAD_ROWS / "interactions.csv")
    got = _parse_all(source_spec.make_spec(records.INTERACTIONS, path, "csv"))
    assert got[f"{path}:2"] == records.Interaction("u1", "i1", 1700000000, 1.0, 4.0, "view", f"{path}:2")
    assert got[f"{path}:3"].weight == 1.0  # empty weight
    # 2023-11-14T22:13:20Z is 1700000000 s.
    assert (got[f"{path}:4"].timestamp, got[f"{path}:4"].rating, got[f"{path}:4"].weight) == (1700000000, None, 2.5)
    items_path = str(BAD_ROWS / "items.csv")
    items = _parse_all(source_spec.make_spec(records.ITEMS, items_path, "csv"))
    assert items[f"{items_path}:3"].title == "Heat, the movie"
    assert items[f"{items_path}:5"].categories == ()
    users_path = str(BAD_ROWS / "users.csv")
    users = _parse_all(source_spec.make_spec(records.USERS, users_path, "csv"))
    assert users[f"{users_path}:3"].attributes == (("gender", "F"), ("occupation", "other"))


def test_row_error_details_name_field_and_value():
    path = str(BAD_ROWS / "interactions.csv")
    spec = source_spec.make_spec(records.INTERACTIONS, path, "csv")
    errors = {}
    for row in files.iter_raw_rows(spec, path):
        try:
            readers.parse_row(spec, row)
        except records.RowError as e:
            errors[e.reason] = e.detail
    assert "rating='abc'" in errors[records.BAD_NUMBER]
    assert "user_id" in errors[records.MISSING_FIELD]
    assert "99999999999" in errors[records.BAD_TIMESTAMP] and "timestamp_unit" in errors[records.BAD_TIMESTAMP]
    assert "\\xff" in errors[records.BAD_ENCODING]
    assert "expected 6" in errors[records.MALFORMED_ROW]


@pytest.mark.parametrize("value,expected", [
    ("1700000000", 1700000000),
    ("1700000000.9", 1700000000),
    ("2023-11-14T22:13:20+00:00", 1700000000),
    ("2023-11-14 23:13:20+01:00", 1700000000),
    ("2023-11-14", 1699920000),
    ("yesterday", records.BAD_TIMESTAMP),
    ("nan", records.BAD_TIMESTAMP),
    ("0", records.BAD_TIMESTAMP),  # below min_timestamp=1
    ("4102444801", records.BAD_TIMESTAMP),
    ("", records.MISSING_FIELD),
])
def test_timestamp_rules(tmp_path, value, expected):
    path = _write(tmp_path / "i.csv", f"user_id,item_id,timestamp\nu,i,{value}\n")
    [result] = _parse_all(source_spec.make_spec(records.INTERACTIONS, path, "csv")).values()
    assert (result if isinstance(result, str) else result.timestamp) == expected


def test_timestamp_milliseconds_and_custom_range(tmp_path):
    path = _write(tmp_path / "i.csv", "user_id,item_id,timestamp\nu,i,1700000000123\nu,i,1000\n")
    spec = source_spec.make_spec(records.INTERACTIONS, path, "csv", timestamp_unit="ms", min_timestamp=1000000000)
    ok, too_early = _parse_all(spec).values()
    assert ok.timestamp == 1700000000 and too_early == records.BAD_TIMESTAMP


@pytest.mark.parametrize("weight,rating,expected", [
    ("0", "", records.BAD_NUMBER),
    ("-1", "", records.BAD_NUMBER),
    ("inf", "", records.BAD_NUMBER),
    ("x", "", records.BAD_NUMBER),
    ("", "nan", records.BAD_NUMBER),
    ("0.5", "3.5", (0.5, 3.5)),
])
def test_weight_and_rating_rules(tmp_path, weight, rating, expected):
    path = _write(tmp_path / "i.csv", f"user_id,item_id,timestamp,weight,rating\nu,i,1700000000,{weight},{rating}\n")
    [result] = _parse_all(source_spec.make_spec(records.INTERACTIONS, path, "csv")).values()
    assert (result if isinstance(result, str) else (result.weight, result.rating)) == expected


def test_blank_lines_skipped_and_line_numbers_physical(tmp_path):
    path = _write(tmp_path / "i.csv", "user_id,item_id,timestamp\r\n\r\nu,i,1700000000\r\n   \r\nv,j,1700000001\r\n")
    rows = list(files.iter_raw_rows(source_spec.make_spec(records.INTERACTIONS, path, "csv"), path))
    assert [(r.location, r.payload) for r in rows] == [(f"{path}:3", b"u,i,1700000000"), (f"{path}:5", b"v,j,1700000001")]


# --------------------------------------------------------------------------- check_source


def test_check_source_missing_file(tmp_path):
    spec = source_spec.make_spec(records.INTERACTIONS, str(tmp_path / "nope.csv"), "csv")
    with pytest.raises(records.InputError, match="nope.csv.*no file matches"):
        readers.check_source(spec)


def test_check_source_empty_file(tmp_path):
    path = _write(tmp_path / "empty.csv", "")
    with pytest.raises(records.InputError, match="empty.csv.*empty"):
        readers.check_source(source_spec.make_spec(records.INTERACTIONS, path, "csv"))


def test_check_source_csv_missing_column(tmp_path):
    path = _write(tmp_path / "i.csv", "user_id,item,timestamp\nu,i,1\n")
    with pytest.raises(records.InputError) as e:
        readers.check_source(source_spec.make_spec(records.INTERACTIONS, path, "csv"))
    message = str(e.value)
    assert "i.csv" in message and "['item_id']" in message and "'item'" in message


def test_check_source_jsonl_not_json(tmp_path):
    path = _write(tmp_path / "i.jsonl", "user_id,item_id,timestamp\n")
    with pytest.raises(records.InputError, match="i.jsonl.*not JSON"):
        readers.check_source(source_spec.make_spec(records.INTERACTIONS, path, "jsonl"))
    path = _write(tmp_path / "list.jsonl", "[1, 2]\n")
    with pytest.raises(records.InputError, match="list.jsonl.*not an object"):
        readers.check_source(source_spec.make_spec(records.INTERACTIONS, path, "jsonl"))


def test_check_source_parquet_not_parquet(tmp_path):
    path = _write(tmp_path / "i.parquet", "user_id,item_id,timestamp\nu,i,1\n")
    with pytest.raises(records.InputError, match="i.parquet.*not a Parquet file"):
        readers.check_source(source_spec.make_spec(records.INTERACTIONS, path, "parquet"))


def test_check_source_parquet_missing_column(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = str(tmp_path / "i.parquet")
    pq.write_table(pa.table({"user_id": ["u"], "timestamp": [1]}), path)
    with pytest.raises(records.InputError, match=r"i.parquet.*\['item_id'\]"):
        readers.check_source(source_spec.make_spec(records.INTERACTIONS, path, "parquet"))


def test_glob_expansion_tolerates_empty_shard(tmp_path):
    _write(tmp_path / "part-0.csv", "user_id,item_id,timestamp\nu,i,1700000000\n")
    _write(tmp_path / "part-1.csv", "")
    spec = source_spec.make_spec(records.INTERACTIONS, str(tmp_path / "part-*.csv"), "csv")
    readers.check_source(spec)
    assert [os.path.basename(p) for p in files.expand_paths(spec)] == ["part-0.csv", "part-1.csv"]
    assert len(_records(spec)) == 1


# --------------------------------------------------------------------------- mapping, formats


def test_column_mapping(tmp_path):
    path = _write(tmp_path / "log.csv", "uid;iid;ts\nu1;i1;1700000000\n")
    [spec] = readers.generic_sources(path, str(tmp_path / "x.csv"), columns={
        "user_id": "uid", "item_id": "iid", "timestamp": "ts"}, delimiter=";")[:1]
    readers.check_source(spec)
    [rec] = _records(spec)
    assert (rec.user_id, rec.item_id, rec.timestamp) == ("u1", "i1", 1700000000)


def test_generic_sources_infers_format_and_per_kind_columns(tmp_path):
    specs = readers.generic_sources(
        "a/i.jsonl", "a/items.parquet", "a/users.csv.gz", columns={records.USERS: {"user_id": "uid"}}
    )
    assert [(s.kind, s.format) for s in specs] == [
        (records.INTERACTIONS, "jsonl"), (records.ITEMS, "parquet"), (records.USERS, "csv")]
    assert specs[2].column_map() == {"user_id": "uid"}
    with pytest.raises(records.InputError, match="cannot tell the format"):
        readers.generic_sources("a/i.txt", "a/items.csv")
    with pytest.raises(ValueError, match="not a items field"):
        source_spec.make_spec(records.ITEMS, "x.csv", "csv", columns={"user_id": "u"})


TABLES = {
    records.INTERACTIONS: [
        {"user_id": "u1", "item_id": "i1", "timestamp": 1700000000, "rating": 4.5, "weight": 2.0, "event_type": "buy"},
        {"user_id": "u2", "item_id": "i2", "timestamp": 1700000100, "rating": None, "weight": None, "event_type": None},
    ],
    records.ITEMS: [
        {"item_id": "i1", "title": "Toy Story", "categories": ["Animation", "Comedy"], "description": "toys"},
        {"item_id": "i2", "title": "Heat, the movie", "categories": [], "description": None},
    ],
    records.USERS: [
        {"user_id": "u1", "age": "24", "occupation": "writer"},
        {"user_id": "u2", "age": None, "occupation": "artist"},
    ],
}


@pytest.mark.parametrize("kind", [records.INTERACTIONS, records.ITEMS, records.USERS])
def test_jsonl_parquet_round_trip(tmp_path, kind):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = TABLES[kind]
    jsonl = str(tmp_path / f"{kind}.jsonl")
    with open(jsonl, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    parquet = str(tmp_path / f"{kind}.parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet)

    results = []
    for path, fmt in ((jsonl, "jsonl"), (parquet, "parquet")):
        spec = source_spec.make_spec(kind, path, fmt)
        readers.check_source(spec)
        results.append(_records(spec))
    from_jsonl, from_parquet = results
    assert [_strip_location(r) for r in from_jsonl] == [_strip_location(r) for r in from_parquet]
    assert from_parquet[0].location == f"{parquet}:row 1"
    assert from_jsonl[1].location == f"{jsonl}:2"  # no header: first line is row 1
    if kind == records.INTERACTIONS:
        assert (from_jsonl[0].weight, from_jsonl[1].weight, from_jsonl[1].rating) == (2.0, 1.0, None)
    if kind == records.ITEMS:
        assert from_jsonl[0].categories == ("Animation", "Comedy")
    if kind == records.USERS:
        assert from_jsonl[1].attributes == (("occupation", "artist"),)


def test_jsonl_bad_rows(tmp_path):
    path = tmp_path / "i.jsonl"
    path.write_bytes(
        b'{"user_id": 7, "item_id": "i1", "timestamp": "2023-11-14T22:13:20Z"}\n'
        b'{"user_id": "u", "item_id": "i1", "timestamp": 1700000000, "rating": true}\n'
        b'{"user_id": "u", "item_id": "i1"}\n'
        b"[1, 2, 3]\n"
        b'{"user_id": "u", \n'
        b'{"user_id": "\xff", "item_id": "i1", "timestamp": 1}\n'
    )
    ok, *bad = _parse_all(source_spec.make_spec(records.INTERACTIONS, str(path), "jsonl")).values()
    assert (ok.user_id, ok.timestamp) == ("7", 1700000000)  # integer ids become strings
    assert bad == [records.BAD_NUMBER, records.MISSING_FIELD, records.MALFORMED_ROW,
                   records.MALFORMED_ROW, records.BAD_ENCODING]


def test_item_categories_string_in_jsonl(tmp_path):
    path = _write(tmp_path / "items.jsonl", '{"item_id": "i1", "title": "T", "categories": "A| B||A"}\n')
    [item] = _records(source_spec.make_spec(records.ITEMS, path, "jsonl"))
    assert item.categories == ("A", "B")


def test_gzip_csv_streams(tmp_path):
    import gzip

    path = str(tmp_path / "i.csv.gz")
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("user_id,item_id,timestamp\nu,i,1700000000\n")
    spec = readers.generic_sources(path, "items.csv")[0]
    readers.check_source(spec)
    assert [r.location for r in _records(spec)] == [f"{path}:2"]


# --------------------------------------------------------------------------- MovieLens CSV


def test_movielens_csv_sources(tmp_path):
    _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,x,964981247\n")
    _write(tmp_path / "movies.csv",
           'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation|Children\n'
           '11,"American President, The (1995)",Comedy|Drama|Romance\n'
           "182727,A Christmas Story Live! (2017),(no genres listed)\n")
    _write(tmp_path / "tags.csv", 'userId,movieId,tag,timestamp\n2,60756,"funny, sort of",1445714994\n2,1,,1\n')
    specs = {s.kind: s for s in movielens.movielens_csv_sources(str(tmp_path))}
    assert set(specs) == {records.INTERACTIONS, records.ITEMS, records.TAGS}
    for spec in specs.values():
        readers.check_source(spec)
    rating, bad = _parse_all(specs[records.INTERACTIONS]).values()
    assert (rating.user_id, rating.item_id, rating.rating, rating.timestamp) == ("1", "1", 4.0, 964982703)
    assert bad == records.BAD_NUMBER
    items = _records(specs[records.ITEMS])
    assert items[1].title == "American President, The (1995)"
    assert items[0].categories == ("Adventure", "Animation", "Children") and items[2].categories == ()
    tag, missing = _parse_all(specs[records.TAGS]).values()
    assert (tag.item_id, tag.tag) == ("60756", "funny, sort of")
    assert missing == records.MISSING_FIELD


def test_movielens_csv_without_tags(tmp_path):
    _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n")
    _write(tmp_path / "movies.csv", "movieId,title,genres\n")
    assert [s.kind for s in movielens.movielens_csv_sources(str(tmp_path))] == [records.INTERACTIONS, records.ITEMS]


def test_spec_is_hashable_and_picklable():
    import pickle

    spec = source_spec.make_spec(records.ITEMS, "u.item", "ml100k", genres=["a", "b"])
    assert pickle.loads(pickle.dumps(spec)) == spec and hash(spec) == hash(spec)
    assert spec.option("encoding") == "latin-1" and spec.option("genres") == ("a", "b")


def test_parse_row_never_raises_anything_but_row_error(tmp_path):
    """Hostile values must dead-letter, never crash a Beam worker."""
    values = [None, True, 1.5, 10**400, -1, "", " ", "x", [], ["a", None], {"a": 1}, "1e999", "9" * 5000]
    rows = [
        {"user_id": v, "item_id": w, "timestamp": t, "rating": v, "weight": w, "title": t, "categories": v, "tag": w}
        for v in values for w in values[:5] for t in values
    ]
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "nope\n\"s\"\n{}\n\xff\n", encoding="latin-1")
    for kind in (records.INTERACTIONS, records.ITEMS, records.USERS, records.TAGS):
        spec = source_spec.make_spec(kind, str(path), "jsonl")
        for row in files.iter_raw_rows(spec, str(path)):
            try:
                readers.parse_row(spec, row)
            except records.RowError:
                pass
        parquet_spec = source_spec.make_spec(kind, "mem.parquet", "parquet")
        for payload in rows:  # the same values as Parquet dict payloads
            try:
                readers.parse_row(parquet_spec, records.RawRow(kind, "mem.parquet:row 1", payload))
            except records.RowError:
                pass
