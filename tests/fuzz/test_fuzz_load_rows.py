"""``telematics-reg load`` rows from hostile files: CSV and JSON Lines, any encoding, BOMs, huge lines.

Properties: reading never raises; every row is either sendable (its body is what the service's parser accepts)
or invalid with at least one reason; rows come in file order; a well-formed registration line always comes
through unchanged, whatever junk surrounds it.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from telematics_cli.rows import InputFormat, Row, read_rows
from telematics_reg.models import parse_registration_message

from .conftest import INPUTS
from .strategies import any_json, client_ids, hostile_text, registration_like, valid_registration

ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "latin-1", "cp1252"]
NEWLINES = ["\n", "\r\n", "\r"]


def _read(data: bytes, fmt: InputFormat) -> list[Row]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"rows.{fmt.value}"
        path.write_bytes(data)
        return list(read_rows(path, fmt, "0" * 64))


def _check_rows(rows: list[Row]) -> None:
    lines = [row.line for row in rows]
    assert lines == sorted(lines)
    assert len(set(lines)) == len(lines)
    for row in rows:
        if row.valid:
            assert row.body is not None
            parse_registration_message(row.body)  # what the service will accept
            assert not row.errors
        else:
            assert row.errors, row


def _encode(text: str, encoding: str) -> bytes:
    # A lone surrogate becomes bytes that are not valid UTF-8: hostile input too.
    return text.encode(encoding, errors="replace" if encoding in ("latin-1", "cp1252") else "surrogatepass")


junk_lines = st.one_of(
    hostile_text,
    any_json.map(json.dumps),
    registration_like.map(json.dumps),
    st.integers(min_value=900, max_value=30_000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(min_value=900, max_value=30_000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
    st.sampled_from([70_000, 140_000]).map(lambda size: json.dumps({"ClientId": "big", "FirstName": "x" * size})),
    st.just(json.dumps({"Quantity": 3})),
)


@given(
    good=st.lists(client_ids(), max_size=4, unique=True).flatmap(
        lambda ids: st.tuples(*(valid_registration(f"good-{cid}") for cid in ids))
    ),
    junk=st.lists(junk_lines, max_size=5),
    encoding=st.sampled_from(ENCODINGS),
    newline=st.sampled_from(NEWLINES[:2]),
    order=st.randoms(use_true_random=False),
)
@example(good=({"ClientId": "good-1"},), junk=["[" * 20_000 + "]" * 20_000], encoding="utf-8", newline="\n",
         order=__import__("random").Random(0))  # fmt: skip
@example(good=({"ClientId": "good-1"},), junk=['{"a":' * 3000 + "1" + "}" * 3000], encoding="utf-8", newline="\n",
         order=__import__("random").Random(0))  # fmt: skip
def test_jsonl_rows_from_any_file(
    good: tuple[dict[str, Any], ...], junk: list[str], encoding: str, newline: str, order: Any
) -> None:
    lines = [("good", json.dumps(g, ensure_ascii=False)) for g in good] + [("junk", j) for j in junk]
    order.shuffle(lines)
    text = newline.join(line.replace("\n", " ").replace("\r", " ") for _, line in lines)
    data = _encode(text, encoding)
    INPUTS("load jsonl file")
    INPUTS("load jsonl line", len(lines))

    rows = _read(data, InputFormat.JSONL)

    _check_rows(rows)
    if encoding in ("utf-8", "utf-8-sig"):
        # A file in UTF-8 (with or without BOM): every well-formed registration arrives, as written.
        sent = [json.loads(row.body) for row in rows if row.valid and row.body is not None]
        for kind, line in lines:
            if kind == "good":
                assert json.loads(line) in sent


csv_cells = st.one_of(hostile_text, st.text(max_size=10), st.sampled_from(["true", "0", "-1", "1e3", '{"a":', "{"]))
csv_headers = st.lists(
    st.one_of(
        st.sampled_from(["ClientId", "clientid", "FirstName", "Quantity", "UserFields.EnableTracking",
                         "UserFields.ClientId", "UserFields", "CustomFields.Enabled", "Instance", "RequestId"]),
        hostile_text,
    ),
    min_size=1,
    max_size=5,
)  # fmt: skip


@given(
    header=csv_headers,
    rows=st.lists(st.lists(csv_cells, max_size=6), max_size=5),
    encoding=st.sampled_from(ENCODINGS),
    newline=st.sampled_from(NEWLINES),
    huge=st.sampled_from([0, 0, 0, 140_000]),
)
@example(header=["ClientId", "UserFields"], rows=[["c", '{"a":' * 3000 + "1" + "}" * 3000]], encoding="utf-8",
         newline="\n", huge=0)  # fmt: skip
@example(header=["ClientId"], rows=[["c"]], encoding="utf-8", newline="\n", huge=140_000)
def test_csv_rows_from_any_file(
    header: list[str], rows: list[list[str]], encoding: str, newline: str, huge: int
) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=newline)
    writer.writerow(header)
    writer.writerows(rows)
    if huge:
        writer.writerow(["x" * huge])
        writer.writerow(["after-the-huge-one"])
    INPUTS("load csv file")
    INPUTS("load csv row", len(rows) + 1)

    found = _read(_encode(buffer.getvalue(), encoding), InputFormat.CSV)

    _check_rows(found)


@given(data=st.binary(max_size=300), fmt=st.sampled_from(list(InputFormat)))
@example(data=b"\xef\xbb\xbf\xef\xbb\xbf{}", fmt=InputFormat.JSONL)
@example(data=b"\xff\xfe" + '{"ClientId": "c"}'.encode("utf-16-le"), fmt=InputFormat.JSONL)
@example(data=b'ClientId\n"unterminated\n', fmt=InputFormat.CSV)
@example(data=b"ClientId\x00\nc\x00\n", fmt=InputFormat.CSV)
def test_rows_from_arbitrary_bytes(data: bytes, fmt: InputFormat) -> None:
    INPUTS(f"load {fmt.value} file")
    _check_rows(_read(data, fmt))
