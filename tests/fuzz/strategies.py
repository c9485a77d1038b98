"""Generators of hostile input: any JSON, registration-shaped objects with wrong types, control characters,
and the edge values (sizes, numbers, encodings) where parsers tend to break."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

# Every control character a terminal acts on, and the escape sequences that matter most.
C0 = "".join(chr(c) for c in range(0x20)) + "\x7f"
C1 = "".join(chr(c) for c in range(0x80, 0xA0))
ESCAPE_SEQUENCES = [
    "\x1b[2J",  # clear screen
    "\x1b[31m",  # colour
    "\x1b]0;owned\x07",  # OSC: window title
    "\x1b]8;;https://example.invalid\x1b\\link\x1b]8;;\x1b\\",  # OSC 8 hyperlink
    "\x1b]52;c;Y2xpcGJvYXJk\x07",  # OSC 52: write the clipboard
    "\x9b2J",  # 8-bit CSI
    "\x9d0;owned\x9c",  # 8-bit OSC ... ST
    "\x1bP+q\x1b\\",  # DCS
    "\x1bc",  # full reset
]

hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from(C0 + C1 + "ab[]/\\;"), max_size=20),
    st.lists(st.sampled_from([*ESCAPE_SEQUENCES, "x", "[red]", "[/]", "\ud800", "\uffff", "\u202e"]), max_size=5).map(
        "".join
    ),
)

edge_integers = st.one_of(
    st.integers(min_value=-3, max_value=300),
    st.sampled_from([0, -1, 100, 101, 10_000, 10_001, 2**31, 2**63, -(2**63), 10**30, 10**38, 10**400]),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    edge_integers,
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
)

any_json = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4),
    max_leaves=12,
)

# Keys of the registration contract, in every case the contract accepts (and some it does not).
REGISTRATION_KEYS = [
    "ClientId",
    "clientId",
    "CLIENTID",
    "client_id",
    "Instance",
    "FirstName",
    "Email",
    "Gender",
    "Birthday",
    "ChildrenCount",
    "ImageUrl",
    "Status",
    "CreateAccessToken",
    "UserFields",
    "CustomToken",
    "Quantity",
    "quantity",
    "RequestId",
    "CustomFields",
]
USER_FIELD_KEYS = ["ClientId", "EnableTracking", "enabletracking", "Enabled", "EnableLogging", "EnableRealtimeLocation"]

registration_like = st.dictionaries(
    st.sampled_from(REGISTRATION_KEYS) | hostile_text,
    st.one_of(
        json_scalars,
        st.dictionaries(st.sampled_from(USER_FIELD_KEYS) | hostile_text, json_scalars, max_size=4),
        any_json,
    ),
    max_size=6,
)

deep_json = st.integers(min_value=900, max_value=20_000).map(lambda depth: "[" * depth + "]" * depth)


def _huge(size: int) -> str:
    return json.dumps({"ClientId": "c", "FirstName": "x" * size})


message_bodies = st.one_of(
    registration_like.map(json.dumps),
    any_json.map(json.dumps),
    hostile_text,
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    deep_json,
    st.sampled_from([70_000, 65_500, 64 * 1024]).map(_huge),
    st.sampled_from(["", " ", "null", "[]", '"x"', "1e999", "NaN", "-Infinity", '{"ClientId": NaN}', '{"a":1,"a":2}']),
)


def client_ids(prefix: str = "") -> st.SearchStrategy[str]:
    """Valid ClientIds: printable text of 1 to 128 characters."""
    return st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1, max_size=40).map(
        lambda text: (prefix + text)[:128]
    )


def valid_registration(client_id: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"ClientId": st.just(client_id)},
        optional={
            "FirstName": st.text(max_size=20),
            "Gender": st.sampled_from(["Male", "female", "OTHER", "None"]),
            "ChildrenCount": st.integers(min_value=0, max_value=100),
            "CreateAccessToken": st.booleans(),
            "UserFields": st.fixed_dictionaries({}, optional={"EnableTracking": st.booleans()}),
        },
    )
