"""Generators of hostile input: any JSON, registration-shaped objects with wrong types, control characters,
and the edge values (sizes, numbers, encodings) where parsers tend to break."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
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


# ------------------------------------------------------------------------------------------------ lifecycle

#: The fuzz worlds' clock (tests.unit.worlds.FakeClock's start) as the contract writes a time.
NOW_ISO = "2027-01-15T08:00:00.000Z"
#: Profile values are drawn with this prefix, so that a test can look for them in what must not hold them.
PROFILE_MARK = "pii-"
LIFECYCLE_DETAIL_TYPES = ["UserUpdated", "UserDeactivated", "UserReactivated", "UserDeleted", "UserMoved"]
PROFILE_KEYS = ["FirstName", "LastName", "Nickname", "Phone", "Email", "City", "Address", "Country", "Birthday"]

occurred_values = st.one_of(
    st.sampled_from(
        [
            NOW_ISO,
            "2027-01-15T07:59:59.999Z",
            "2027-01-15T08:00:00.001+00:00",
            "2020-02-29T12:00:00.000Z",
            "2027-01-15T09:00:00.000Z",  # an hour ahead of the worlds' clock
            "2127-01-15T08:00:00.000Z",
            "9999-12-31T23:59:59.999Z",
            "9999-12-31T23:59:59-02:00",  # past the calendar once in UTC
            "0001-01-01T00:00:00+02:00",  # before it
            "0001-01-01T00:00:00Z",
            "2027-01-15T08:00:00",  # no zone
            "2027-13-45T99:00:00Z",
            "yesterday",
            "",
            "1800000000",
        ]
    ),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(),
    hostile_text,
    st.none(),
)
instance_values = st.one_of(st.sampled_from(["default", "eu", "fleet-eu", "nowhere", "DEFAULT", ""]), hostile_text)
action_values = st.one_of(
    st.sampled_from(["Update", "update", "DEACTIVATE", "Reactivate", "Delete", "Move", " move ", "", "Register"]),
    json_scalars,
)
profile_text = st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), min_size=4, max_size=30).map(
    lambda text: PROFILE_MARK + text
)
profile_values = st.one_of(
    profile_text,
    json_scalars,
    st.sampled_from([70_000, 5_000]).map(lambda n: PROFILE_MARK + "x" * n),
)
lifecycle_flags = st.dictionaries(
    st.sampled_from([*USER_FIELD_KEYS, "EnableRealTimeLocation", "clientId"]) | hostile_text,
    st.one_of(st.booleans(), json_scalars),
    max_size=4,
)
valid_flags = st.dictionaries(
    st.sampled_from(["Enabled", "EnableTracking", "enableLogging", "EnableRealTimeLocation", "EnableRealtimeLocation"]),
    st.booleans(),
    min_size=1,
    max_size=3,
)
valid_occurred = st.one_of(
    st.integers(min_value=-86_400_000, max_value=86_400_000).map(
        lambda offset: (
            (datetime.fromisoformat(NOW_ISO) + timedelta(milliseconds=offset))
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
    ),
    # Valid by the calendar, if not by the clock (an hour ahead, a century ahead, the calendar's last instant).
    st.sampled_from(["2020-02-29T12:00:00.000Z", "2027-01-15T09:00:00.000Z", "2127-01-15T08:00:00.000Z"]),
    st.just("9999-12-31T23:59:59.999Z"),
)

# Per key of the contract: (values of the right type, any values, chance in 10 of being present).
_LIFECYCLE_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any], int]] = {
    "Action": (st.sampled_from(["Update", "update", "DEACTIVATE", "Reactivate", "Delete", "Move"]), action_values, 9),
    "ClientId": (st.sampled_from(["known-1", "known-2", "unknown-1"]), json_scalars, 9),
    "Instance": (st.sampled_from(["default", "DEFAULT", "eu"]), instance_values, 3),
    "ToInstance": (st.sampled_from(["eu", "fleet-eu", "default"]), instance_values, 3),
    "OccurredAt": (valid_occurred, occurred_values, 6),
    "UserFields": (valid_flags, lifecycle_flags, 3),
    "Gender": (st.sampled_from(["Male", "female", "Other"]), json_scalars, 1),
    "ChildrenCount": (st.integers(min_value=0, max_value=100), edge_integers, 1),
    "ImageUrl": (st.just("https://example.com/a.png"), hostile_text, 1),
    **dict.fromkeys(PROFILE_KEYS, (profile_text, profile_values, 3)),
}
#: What each Action takes besides the envelope (Action, ClientId, Instance, OccurredAt).
_TAKES = {
    "update": {"UserFields", "Gender", "ChildrenCount", "ImageUrl", *PROFILE_KEYS},
    "move": {"ToInstance"},
}
_ENVELOPE = {"Action", "ClientId", "Instance", "OccurredAt"}


def _spelled(key: str, how: int) -> str:
    return [key, key[0].lower() + key[1:], key.upper()][how]


@st.composite
def lifecycle_like(draw: st.DrawFn, *, detail_type: str | None = None) -> dict[str, Any]:
    """A lifecycle change's shape: the contract's keys in PascalCase, camelCase or upper case. Most are valid or
    nearly (one wrong value, one key another action takes, one unknown key), the rest anything; ``detail_type``
    (an event's detail) makes ``Action`` rare."""
    wild = draw(st.integers(min_value=0, max_value=9)) < 2  # any value of any key
    slips = 0 if wild else draw(st.sampled_from([0, 0, 0, 1]))  # a valid change, or one slip in it
    action = str(draw(_LIFECYCLE_FIELDS["Action"][0])).lower()
    event_action = {"UserUpdated": "update", "UserMoved": "move"}.get(detail_type or "", "")
    takes = _ENVELOPE | _TAKES.get(event_action if detail_type else action, set())
    document: dict[str, Any] = {}
    for key, (right, anything, chance) in _LIFECYCLE_FIELDS.items():
        present = 1 if key == "Action" and detail_type else 9 if key == "ToInstance" and key in takes else chance
        if not wild and key not in takes:
            present = 0 if not slips else 1
        if draw(st.integers(min_value=0, max_value=9)) >= present:
            continue
        spelled = _spelled(key, draw(st.integers(min_value=0, max_value=2)))
        if key == "Action" and not wild:
            document[spelled] = draw(st.sampled_from([action, action.title(), action.upper()]))
        elif wild or (slips and draw(st.integers(min_value=0, max_value=9)) == 0):
            document[spelled] = draw(anything)
        else:
            document[spelled] = draw(right)
    if wild or (slips and draw(st.booleans())):
        document |= draw(st.dictionaries(hostile_text, json_scalars, max_size=2))
    return document


@st.composite
def lifecycle_events(draw: st.DrawFn) -> dict[str, Any]:
    """An EventBridge event as the rule delivers it to the lifecycle queue, or something shaped like one."""
    detail_type = draw(
        st.integers(min_value=0, max_value=9).flatmap(
            lambda n: (
                st.sampled_from(LIFECYCLE_DETAIL_TYPES)
                if n < 8
                else st.one_of(st.sampled_from(["UserSignedUp", "UserErased", ""]), hostile_text)
            )
        )
    )
    event: dict[str, Any] = {
        "detail-type": detail_type,
        "detail": draw(lifecycle_like(detail_type=str(detail_type)) if draw(st.integers(0, 4)) else any_json),
    }
    event |= draw(
        st.fixed_dictionaries(
            {},
            optional={
                "time": st.sampled_from([NOW_ISO, "2027-01-15T07:59:00Z", "9999-12-31T23:59:59Z", "not a time"]),
                "source": st.just("customer.app"),
                "id": hostile_text,
            },
        )
    )
    return event


_changes = lifecycle_like().map(json.dumps)
_events = lifecycle_events().map(json.dumps)
#: Lifecycle queue bodies: mostly changes and events shaped like the contract, some anything at all.
lifecycle_bodies = st.integers(min_value=0, max_value=5).flatmap(
    lambda n: _changes if n < 3 else _events if n < 5 else message_bodies
)
