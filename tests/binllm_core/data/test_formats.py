"""Format detection and parsing as plain functions (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from binllm_core.config import load_config
from binllm_core.data.formats import FORMATS as REGISTRY
from binllm_core.data.formats import (
    INTERACTIONS,
    dedupe_items,
    detect,
    parse_interactions,
    parse_items,
)
from binllm_core.data.sources import first_line, lines_before, list_source, plan_chunks, read_chunk
from binllm_core.errors import ConfigError, DataError
from tests.conftest import FIXTURES

FORMATS = FIXTURES / "formats"


def parse(fmt: str, data: bytes, skip_bad: bool = False) -> tuple[pa.Table, pa.Table]:
    return parse_interactions(
        fmt, data, offset=0, header=None, label="f", skip_bad=skip_bad, lines_before=lambda: 0
    )


@pytest.mark.parametrize(
    ("files", "fmt", "name", "expected"),
    [
        (["ml-100k/u.data", "ml-100k/u.item", "ml-100k/u.user"], "auto", "", "ml100k"),
        (["ml-1m/ratings.dat", "ml-1m/movies.dat", "ml-1m/users.dat"], "auto", "", "ml1m"),
        (["ratings.csv", "movies.csv", "tags.csv", "links.csv"], "auto", "", "ml_csv"),
        (["Books_5.json.gz", "meta_Books.json.gz"], "auto", "", "amazon2018"),
        (["Books.jsonl", "meta_Books.jsonl"], "auto", "", "amazon2023"),
        (["Books.jsonl", "meta_Books.jsonl"], "amazon2018", "", "amazon2018"),
        (["a.inter", "a.item", "b.inter", "b.item"], "auto", "b", "recbole"),
        (["x/u.data", "x/u.item", "x.inter", "x.item"], "ml100k", "", "ml100k"),
    ],
)
def test_detect(files: list[str], fmt: str, name: str, expected: str) -> None:
    assert detect(files, fmt, name, root_name="x").format == expected


def test_detect_picks_files_and_names() -> None:
    layout = detect(["Books_5.json.gz", "meta_Books.json.gz"])
    assert (layout.name, layout.interactions, layout.items) == (
        "Books_5",
        "Books_5.json.gz",
        "meta_Books.json.gz",
    )
    assert detect(["u.data", "u.item"], root_name="ml-100k").name == "ml-100k"


def test_detect_errors_are_one_clear_line() -> None:
    with pytest.raises(DataError, match=r"several datasets: a \(recbole\), b \(recbole\)"):
        detect(["a.inter", "a.item", "b.inter", "b.item"])
    with pytest.raises(DataError, match="has no u.item next to it; add u.item") as err:
        detect(["ml-100k/u.data", "ml-100k/u.user"])
    assert "\n" not in str(err.value)
    with pytest.raises(DataError) as err:
        detect(["notes.txt", "data.bin"])
    message = str(err.value)
    assert "notes.txt, data.bin" in message
    assert "ml100k: u.data + u.item" in message and "recbole: NAME.inter + NAME.item" in message
    with pytest.raises(DataError, match="no dataset of format ml1m"):
        detect(["u.data", "u.item"], "ml1m")


def test_ml100k_files() -> None:
    good, rejects = parse("ml100k", (FORMATS / "ml100k" / "u.data").read_bytes())
    assert good.schema == INTERACTIONS and good.num_rows == 12 and rejects.num_rows == 0
    assert good.slice(0, 1).to_pylist()[0] == {
        "user": "196",
        "item": "242",
        "rating": 3.0,
        "timestamp": 881250949,
        "row": 0,
    }
    items, _ = parse_items(
        "ml100k", (FORMATS / "ml100k" / "u.item").read_bytes(), label="i", skip_bad=False
    )
    rows = {r["item"]: r for r in items.to_pylist()}
    assert rows["543"]["title"] == "Misérables, Les (1995)"  # latin-1 in the source
    assert rows["543"]["genres"] == ["Drama", "Musical"] and rows["543"]["year"] == 1995
    assert rows["267"]["year"] is None and rows["267"]["genres"] == ["unknown"]


def test_ml1m_and_csv_files() -> None:
    good, _ = parse("ml1m", (FORMATS / "ml1m" / "ratings.dat").read_bytes())
    assert good.num_rows == 8 and good["timestamp"][0].as_py() == 978300760
    items, _ = parse_items(
        "ml1m", (FORMATS / "ml1m" / "movies.dat").read_bytes(), label="i", skip_bad=False
    )
    assert "Crónica de una muerte anunciada (1987)" in items["title"].to_pylist()
    good, _ = parse("ml_csv", (FORMATS / "ml_csv" / "ratings.csv").read_bytes())
    assert good.num_rows == 7 and good["rating"].to_pylist()[-2:] == [0.5, 2.5]
    items, _ = parse_items(
        "ml_csv", (FORMATS / "ml_csv" / "movies.csv").read_bytes(), label="i", skip_bad=False
    )
    rows = {r["item"]: r for r in items.to_pylist()}
    assert rows["318"]["title"] == "Shawshank Redemption, The (1994)"
    assert rows["99999"]["genres"] == [] and rows["99999"]["year"] == 2001


def test_amazon_files() -> None:
    good, _ = parse("amazon2018", (FORMATS / "amazon2018" / "Beauty_5.json").read_bytes())
    assert good.num_rows == 5 and good["item"][0].as_py() == "0000013714"
    meta = (FORMATS / "amazon2018" / "meta_Beauty.json").read_bytes()
    items = dedupe_items(parse_items("amazon2018", meta, label="m", skip_bad=False)[0])
    rows = {r["item"]: r for r in items.to_pylist()}
    assert len(rows) == 3 and rows["0000013714"]["title"] == "New title"  # the last one wins
    assert rows["0000031887"]["brand"] is None
    assert items.schema.field("category").type == pa.list_(pa.string())
    good, _ = parse("amazon2023", (FORMATS / "amazon2023" / "All_Beauty.jsonl").read_bytes())
    assert good["timestamp"][0].as_py() == 1588687728  # milliseconds -> seconds
    assert good["item"][0].as_py() == "B00YQ6X8EO"  # parent_asin


def test_malformed_lines_error_or_reject() -> None:
    data = b"1\t2\t3\t4\n1\t2\t3\n\n1\t2\tgood\t4\n1\t2\t3\tlater\r\n"
    with pytest.raises(DataError) as err:
        parse("ml100k", data)
    assert str(err.value) == (
        "malformed line in f line 2: expected 4 tab-separated fields, got 3; "
        "fix the line or set data.on_bad_rows: skip"
    )
    good, rejects = parse("ml100k", data, skip_bad=True)
    assert good.num_rows == 1
    assert rejects.to_pylist() == [
        {
            "file": "f",
            "line": 2,
            "text": "1\t2\t3",
            "reason": "expected 4 tab-separated fields, got 3",
        },
        {"file": "f", "line": 4, "text": "1\t2\tgood\t4", "reason": "rating good is not a number"},
        {
            "file": "f",
            "line": 5,
            "text": "1\t2\t3\tlater",
            "reason": "timestamp later is not a number",
        },
    ]


def test_timestamps_and_ratings_out_of_range_are_bad_lines() -> None:
    data = (
        b"1\t2\t4\t881250949\n"  # fine
        b"1\t3\t4\t-5\n"
        b"1\t4\t4\t881250949000\n"  # milliseconds among seconds
        b"1\t5\t4\t1e30\n"
        b"1\t6\t7\t881250949\n"
        b"1\t7\t0\t881250949\n"
    )
    with pytest.raises(DataError, match="line 2: timestamp -5 is not a time in 1970..2099"):
        parse("ml100k", data)
    good, rejects = parse("ml100k", data, skip_bad=True)
    assert good["item"].to_pylist() == ["2"]
    assert [(r["line"], r["reason"]) for r in rejects.to_pylist()] == [
        (2, "timestamp -5 is not a time in 1970..2099 (seconds since 1970)"),
        (3, "timestamp 881250949000 is not a time in 1970..2099 (seconds since 1970)"),
        (4, "timestamp 1e30 is not a time in 1970..2099 (seconds since 1970)"),
        (5, "rating 7 is outside the ml100k scale 1..5"),
        (6, "rating 0 is outside the ml100k scale 1..5"),
    ]
    # RecBole files have no fixed scale; half stars are on MovieLens' CSV scale.
    assert parse("ml_csv", b"userId,movieId,rating,timestamp\n1,2,0.5,881250949\n")[0].num_rows


def test_encoding_is_the_formats_own_and_a_bad_byte_is_named() -> None:
    latin = "1|Misérables, Les (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    for encoded in (latin.encode("latin-1"), latin.encode("utf-8")):  # either reads the same
        items, _ = parse_items("ml100k", encoded, label="u.item", skip_bad=False)
        assert items["title"].to_pylist() == ["Misérables, Les (1995)"]
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    data = (inter + "1\tcafé\t5\t881250949\n").encode("latin-1")  # not UTF-8: no guessing
    with pytest.raises(DataError) as err:
        parse_interactions(
            "recbole",
            data,
            offset=100,
            header=None,
            label="x.inter",
            skip_bad=False,
            lines_before=lambda: 0,
        )
    at = 100 + data.index(b"\xe9")
    assert str(err.value) == (
        f"x.inter is not valid UTF-8: byte 0xe9 at offset {at}; "
        "save the file as UTF-8, the encoding of its format"
    )
    good, rejects = parse_interactions(
        "recbole",
        data,
        offset=100,
        header=None,
        label="x.inter",
        skip_bad=True,
        lines_before=lambda: 0,
    )
    assert good.num_rows == 0
    assert [(r["line"], r["reason"]) for r in rejects.to_pylist()] == [(2, "not valid UTF-8")]


def test_bad_json_and_missing_column() -> None:
    data = b'{"reviewerID": "u", "asin": "i", "overall": 5, "unixReviewTime": 9}\n{broken\n'
    good, rejects = parse("amazon2018", data, skip_bad=True)
    assert good.num_rows == 1 and rejects["line"].to_pylist() == [2]
    assert rejects["reason"][0].as_py().startswith("not a valid JSON record")
    no_asin = b'{"reviewerID": "u", "overall": 5, "unixReviewTime": 9}\n'
    with pytest.raises(DataError, match="column asin missing in f .*keys: reviewerID"):
        parse("amazon2018", no_asin)
    with pytest.raises(DataError, match="column rating missing in f"):
        parse("ml_csv", b"userId,movieId,stars,timestamp\n1,2,3,4\n")


def test_byte_ranges_give_the_same_rows(tmp_path) -> None:
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{u * 7 % 13}\t{u % 5 + 1}\t{880000000 + u}" for u in range(300)]
    lines[250] = "oops"
    (tmp_path / "big.inter").write_text("\n".join(lines) + "\n")
    (tmp_path / "big.item").write_text("item_id:token\n1\n")
    source = list_source(str(tmp_path), {}, "")
    file = next(f for f in source.files if f.name == "big.inter")
    chunks = plan_chunks(file, chunk_bytes=1000)
    assert len(chunks) > 3
    pieces = [read_chunk(c) for c in chunks]
    assert b"".join(data for _, data in pieces) == (tmp_path / "big.inter").read_bytes()
    tables, rejects = [], []
    for chunk, (offset, data) in zip(chunks, pieces, strict=True):
        good, bad = parse_interactions(
            "recbole",
            data,
            offset=offset,
            header=first_line(file) if chunk.start else None,
            label=file.label,
            skip_bad=True,
            lines_before=lambda chunk=chunk: lines_before(chunk),
        )
        tables.append(good)
        rejects.append(bad)
    whole, _ = parse("recbole", (tmp_path / "big.inter").read_bytes(), skip_bad=True)
    assert pa.concat_tables(tables).equals(whole)
    assert pa.concat_tables(rejects)["line"].to_pylist() == [251]


GOOD_JSON = '{"reviewerID": "u%d", "asin": "i%d", "overall": %s, "unixReviewTime": %s}'
ODD_JSON_LINES = [
    "",
    "   ",
    '{"reviewerID": {"id": 1}, "asin": "i", "overall": 5, "unixReviewTime": 9}',
    '{"reviewerID": "u", "asin": ["i"], "overall": 5, "unixReviewTime": 9}',
    '{"reviewerID": "u", "asin": "i", "overall": [5], "unixReviewTime": 9}',
    '{"reviewerID": "[u]", "asin": "{i}", "overall": 5, "unixReviewTime": 9}',
    '{"reviewerID": true, "asin": 17, "overall": "4", "unixReviewTime": "1e3"}',
    '{"reviewerID": null, "asin": "i", "overall": 5, "unixReviewTime": 9}',
    '{"reviewerID": "u", "asin": "i", "overall": 9.5, "unixReviewTime": -3}',
    '{"reviewerID": "u\\u00e9\\n", "asin": "i", "overall": 4.5, "unixReviewTime": 1.5e9}',
    "[1, 2]",
    "5",
    "{broken",
    '{"reviewerID": "u", "asin": "i", "overall": 5, "unixReviewTime": 9}{"a": 1}',
    "{}",
]


def test_json_read_at_once_gives_what_line_by_line_gives(monkeypatch) -> None:
    """Interaction chunks decoded in one call of polars' NDJSON reader (the fast path) give the
    same rows, row numbers and rejects as line-by-line decoding, for well-formed chunks and for
    chunks with each kind of odd line (then it falls back)."""
    import random

    import binllm_core.data.formats.jsonl as formats

    rng = random.Random(3)
    good = [GOOD_JSON % (k, k % 7, k % 5 + 1, 1500000000 + k) for k in range(40)]
    chunks = [good, good[:1], *(good[:20] + [odd] + good[20:] for odd in ODD_JSON_LINES)]
    chunks += [rng.sample(good + ODD_JSON_LINES, 30) for _ in range(20)]
    at_once, taken = formats._json_at_once, []

    def counted(*args):
        frame = at_once(*args)
        taken.append(frame is not None)
        return frame

    for lines in chunks:
        data = ("\r\n" if rng.random() < 0.3 else "\n").join(lines).encode() + b"\n"
        outcome = {}
        for name, fast in (("fast", counted), ("line by line", lambda *a: None)):
            monkeypatch.setattr(formats, "_json_at_once", fast)
            try:
                outcome[name] = parse("amazon2018", data, skip_bad=True)
            except DataError as err:
                outcome[name] = str(err)
        assert outcome["fast"] == outcome["line by line"], lines
    assert taken[:2] == [True, True] and not all(taken)  # both paths were taken


@pytest.mark.parametrize("fmt", list(REGISTRY))
def test_every_registered_format_reads_its_fixture(fmt: str) -> None:
    """Each entry of the registry, on its fixture folder ``tests/fixtures/formats/<name>``: it is
    detected (also when named), parses without rejects, and parsing its interaction file in two
    byte ranges (the second given the header line when the format has one) gives the same rows."""
    folder = FORMATS / fmt
    files = sorted(p.name for p in folder.iterdir())
    layout = detect(files)
    assert layout.format == fmt and detect(files, fmt) == layout
    data = (folder / layout.interactions).read_bytes()
    whole, rejects = parse(fmt, data)
    assert whole.schema == INTERACTIONS and whole.num_rows > 1 and rejects.num_rows == 0
    cut = data.index(b"\n", len(data) // 2) + 1
    header = data[: data.index(b"\n") + 1].decode() if REGISTRY[fmt].header else None
    halves = [
        parse_interactions(
            fmt, piece, offset=at, header=head, label="f", skip_bad=False, lines_before=lambda: 0
        )[0]
        for piece, at, head in ((data[:cut], 0, None), (data[cut:], cut, header))
    ]
    assert pa.concat_tables(halves).equals(whole)
    items, rejects = parse_items(
        fmt, (folder / layout.items).read_bytes(), label="i", skip_bad=False
    )
    assert {"item", "title", "row"} <= set(items.column_names)
    assert items.num_rows > 0 and rejects.num_rows == 0


def test_an_unknown_format_is_refused_at_load_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("configs/ml100k.yaml", ["data.format=parquet"])
    message = str(err.value)
    assert "\n" not in message
    assert f"data.format = 'parquet' is not one of: auto, {', '.join(REGISTRY)}" in message
    for fmt in ["auto", *REGISTRY]:
        assert load_config("configs/ml100k.yaml", [f"data.format={fmt}"]).data.format == fmt
