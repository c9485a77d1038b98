"""UserServiceClient against hostile upstream answers (served by ``responses``: no sockets), and the refresh
worker on top of it.

Properties (issue 17):

* every call returns a well-formed result or raises an ``UpstreamError``; nothing else escapes (wrong types,
  missing ``Result``, ``Status`` contradicting the HTTP code, huge bodies, invalid JWTs, absurd or negative
  ``ExpiresIn``, non-JSON);
* no InstanceKey, access token or refresh token we sent appears in an error's text, even when the answer
  echoes it;
* an answer we cannot trust never overwrites a stored token.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import responses
from hypothesis import example, given, note
from hypothesis import strategies as st

from telematics_reg.credentials import StaticCredentials
from telematics_reg.errors import UpstreamError
from telematics_reg.models import CreateManyRequest, CreateResult, CreateUserRequest, InstanceCredentials, UserFields
from telematics_reg.refresh import RefreshJob, RefreshOutcome, TokenRefresher
from telematics_reg.registration import tokens_of
from telematics_reg.store import Tokens, UserStatus
from telematics_reg.upstream import UserServiceClient, parse_retry_after
from tests.unit.worlds import TIMING

from .conftest import INPUTS
from .strategies import any_json, edge_integers, hostile_text
from .worlds import captured_logs, leaks, new_world

BASE = "http://user-service.invalid"
INSTANCE_KEY = str(uuid.uuid4())
CREDS = InstanceCredentials.model_validate({"InstanceId": str(uuid.uuid4()), "InstanceKey": INSTANCE_KEY})
USER = uuid.UUID("6d3f8f1e-2f4b-4a53-8d51-3b1b0c2d9e77")
NOW = 1_800_000_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: Any, *, header: Any = None) -> str:
    head = json.dumps(header if header is not None else {"alg": "none"}).encode()
    body = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    return f"{_b64(head)}.{_b64(body)}.sig"


ACCESS = jwt({"DeviceToken": str(USER), "sub": str(USER), "exp": NOW + 3600})
REFRESH = base64.b64encode(uuid.uuid4().bytes * 2).decode()
SECRETS = [INSTANCE_KEY, ACCESS, REFRESH]

# --- answers ---------------------------------------------------------------------------------------------------

echoed_text = st.one_of(
    hostile_text,
    st.lists(st.sampled_from([*SECRETS, "x", " ", INSTANCE_KEY.upper()]), max_size=4).map("".join),
)
invalid_jwts = st.one_of(
    echoed_text,
    st.builds(jwt, any_json),
    st.builds(jwt, st.binary(max_size=40)),
    st.integers(min_value=900, max_value=12_000).map(lambda depth: jwt(b"[" * depth + b"]" * depth)),
    st.builds(lambda exp: jwt({"exp": exp, "DeviceToken": str(USER)}), any_json | edge_integers),
    st.just("a.b.c"),
    st.just(""),
)
device_tokens = st.one_of(st.just(str(USER)), st.just(str(USER).upper()), any_json, st.just(None))
access_tokens = st.one_of(
    st.fixed_dictionaries(
        {"Token": invalid_jwts | st.just(ACCESS), "ExpiresIn": edge_integers | any_json},
    ),
    any_json,
)
results = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "DeviceToken": device_tokens,
            "AccessToken": access_tokens,
            "RefreshToken": echoed_text | any_json,
        },
    ),
    st.fixed_dictionaries({"Results": st.lists(st.fixed_dictionaries({"DeviceToken": device_tokens}), max_size=3)}),
    st.fixed_dictionaries({"UserExists": any_json}),
    any_json,
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "Result": results,
        "Status": st.one_of(st.sampled_from([200, 201, 204, 400, 401, 404, 422, 429, 500, 503]), edge_integers),
        "Title": echoed_text,
        "Errors": st.one_of(
            st.lists(st.fixed_dictionaries({}, optional={"Key": echoed_text, "Message": echoed_text}), max_size=3),
            any_json,
        ),
    },
)
bodies = st.one_of(
    envelopes.map(lambda e: json.dumps(e).encode()),
    any_json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=80),
    st.integers(min_value=900, max_value=50_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.sampled_from([b"", b"null", b"<html>502 Bad Gateway</html>", b'{"Result": NaN}', b"\xef\xbb\xbf{}"]),
)
statuses = st.one_of(st.sampled_from([200, 201, 204, 302, 400, 401, 403, 404, 409, 422, 429, 500, 502, 503]),
                     st.integers(min_value=200, max_value=599))  # fmt: skip
retry_after = st.one_of(st.none(), hostile_text, st.sampled_from(["0", "-5", "1e400", "nan", "99999999999", "3"]))


@st.composite
def answers(draw: st.DrawFn) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json"}
    value = draw(retry_after)
    if value is not None:
        headers["Retry-After"] = value.encode("latin-1", "replace").decode("latin-1").replace("\n", " ")
    return draw(statuses), headers, draw(bodies)


HUGE_TITLE = (422, {}, json.dumps({"Status": 422, "Title": "x" * 3_000_000 + INSTANCE_KEY}).encode())


# What each call sends, so what an answer may echo back: the client keeps these out of its error texts.
SENT_BY = {"refresh": [ACCESS, REFRESH]}


def _echoing_only(body: bytes, *, not_sent: list[str]) -> bytes:
    # An answer can quote what its request carried, not what another call did (see
    # test_a_login_error_quoting_the_users_tokens_is_not_repeated for the worker's own scrubbing).
    for secret in not_sent:
        body = body.replace(json.dumps(secret)[1:-1].encode(), b"not-sent")
        body = body.replace(json.dumps(secret.upper())[1:-1].encode(), b"NOT-SENT")
    return body


@contextmanager
def upstream_answering(
    answer: tuple[int, dict[str, str], bytes], *, login: tuple[int, dict[str, str], bytes] | None = None
) -> Iterator[responses.RequestsMock]:
    status, headers, body = answer
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        if login is not None:
            mock.add(responses.POST, f"{BASE}/v1/Auth/Login", status=login[0], headers=login[1], body=login[2])
        for method in (responses.GET, responses.POST):
            mock.add(method, re.compile(re.escape(BASE) + "/.*"), status=status, headers=headers, body=body)
        yield mock


def _client() -> UserServiceClient:
    return UserServiceClient(BASE, max_attempts=2, max_create_recoveries=1, sleep=lambda _: None)


def _call(client: UserServiceClient, call: str) -> Any:
    if call == "create":
        return client.create(CREDS, CreateUserRequest(custom_token=USER, user_fields=UserFields(client_id="c-1")))
    if call == "create_many":
        return client.create_many(CREDS, CreateManyRequest(quantity=2), [uuid.uuid4(), uuid.uuid4()])
    if call == "refresh":
        return client.refresh(ACCESS, REFRESH)
    if call == "login":
        return client.login(CREDS, USER)
    return client.user_exists(CREDS, "c-1")


def _check_result(result: Any) -> None:
    for item in result if isinstance(result, list) else [result]:
        if isinstance(item, CreateResult):
            assert isinstance(item.device_token, uuid.UUID)
            tokens_of(item, NOW)  # what the caller does next with it: must not blow up either
        else:
            assert isinstance(item, bool)


@given(call=st.sampled_from(["create", "create_many", "refresh", "login", "user_exists"]), answer=answers())
@example(call="refresh", answer=(200, {}, b"[" * 50_000 + b"]" * 50_000))
@example(call="create", answer=(200, {}, json.dumps({"Result": {"DeviceToken": str(USER), "AccessToken": {
    "Token": ACCESS, "ExpiresIn": 10**12}, "RefreshToken": REFRESH}}).encode()))  # fmt: skip
@example(call="refresh", answer=(200, {}, json.dumps({"Result": {"AccessToken": {
    "Token": jwt(b"[" * 5000 + b"]" * 5000), "ExpiresIn": 60}, "RefreshToken": REFRESH}}).encode()))  # fmt: skip
@example(call="login", answer=(200, {}, json.dumps({"Status": 401, "Title": INSTANCE_KEY}).encode()))
@example(call="create", answer=(500, {}, json.dumps({"Status": 200, "Result": {"DeviceToken": str(USER)}}).encode()))
@example(call="refresh", answer=(400, {}, json.dumps({"Title": f"bad {REFRESH} for {ACCESS}"}).encode()))
def test_client_turns_any_answer_into_a_result_or_an_upstream_error_without_secrets(
    call: str, answer: tuple[int, dict[str, str], bytes]
) -> None:
    INPUTS(f"client {call} answer")
    note(f"answer={answer!r}")
    with upstream_answering(answer), _client() as client:
        try:
            result = _call(client, call)
        except UpstreamError as exc:
            text = f"{exc} {exc!r} {[(e.key, e.message) for e in exc.errors]}"
            assert leaks([text], SENT_BY.get(call, [INSTANCE_KEY])) == []
        else:
            _check_result(result)


def test_client_error_text_stays_bounded_whatever_the_answer_size() -> None:
    INPUTS("client login answer")
    with upstream_answering(HUGE_TITLE), _client() as client, pytest.raises(UpstreamError) as caught:
        client.login(CREDS, USER)
    assert len(str(caught.value)) <= 16_384


@given(value=st.one_of(st.text(), st.sampled_from(["Mon, 99 Foo 9999 99:99:99 GMT", "Fri, 31 Dec 9999 23:59:59 GMT",
                                                     "Mon, 01 Jan 0001 00:00:00 GMT", "1e308", "-0"])))  # fmt: skip
def test_retry_after_of_any_text_is_seconds_or_none(value: str) -> None:
    INPUTS("client Retry-After header")
    seconds = parse_retry_after(value)
    assert seconds is None or seconds >= 0


# --- the refresh worker on top of the client -------------------------------------------------------------------


def _stored_user(world: Any) -> Tokens:
    token = str(USER)
    tokens = Tokens(access_token=ACCESS, refresh_token=REFRESH, expires_at=NOW + 60)
    world.store.claim_registration(
        device_token=token, instance="default", instance_id=str(CREDS.instance_id), client_id="c-1",
        owner="o", now=NOW - 3600, ttl=120,
    )  # fmt: skip
    world.store.complete_registration(device_token=token, owner="o", tokens=tokens, now=NOW - 3600)
    return tokens


@given(answer=answers())
@example(answer=(200, {}, json.dumps({"Result": {"DeviceToken": str(USER), "AccessToken": {
    "Token": ACCESS, "ExpiresIn": 10**12}, "RefreshToken": "new"}}).encode()))  # fmt: skip
@example(answer=(200, {}, json.dumps({"Result": {"AccessToken": {
    "Token": jwt(b"[" * 5000 + b"]" * 5000), "ExpiresIn": 60}, "RefreshToken": "new"}}).encode()))  # fmt: skip
@example(answer=(503, {}, json.dumps({"Errors": [{"Key": INSTANCE_KEY}], "Title": ACCESS}).encode()))
@example(answer=(200, {}, json.dumps({"Status": 500, "Result": {"DeviceToken": str(USER), "AccessToken": {
    "Token": "t", "ExpiresIn": 60}, "RefreshToken": "new"}}).encode()))  # fmt: skip
def test_refresh_never_stores_tokens_from_an_answer_it_cannot_trust(answer: tuple[int, dict[str, str], bytes]) -> None:
    INPUTS("refresh worker answer")
    world = new_world()
    world.clock.now = NOW
    stored = _stored_user(world)
    refresher = TokenRefresher(
        upstream=_client(), store=world.store, credentials=StaticCredentials({"default": CREDS}),
        publisher=world.publisher, margin_seconds=600, timing=TIMING, clock=world.clock, sleep=world.clock.sleep,
    )  # fmt: skip
    record = world.store.get_user(str(USER))
    assert record is not None
    status, headers, body = answer
    refresh_answer = (status, headers, _echoing_only(body, not_sent=[INSTANCE_KEY]))
    login_answer = (status, headers, _echoing_only(body, not_sent=[ACCESS, REFRESH]))

    with upstream_answering(refresh_answer, login=login_answer), captured_logs() as logs:
        try:
            outcome = refresher.refresh_job(RefreshJob(str(USER), record.version))
        except UpstreamError:
            # An answer the worker does not expect is deferred with the lease released
            # (test_refresh_worker_defers_an_answer_it_does_not_expect); one that still raises must not have touched
            # the stored pair.
            outcome = None

    after = world.store.get_user(str(USER))
    assert after is not None
    changed = (after.access_token, after.refresh_token) != (stored.access_token, stored.refresh_token)
    if changed:
        assert outcome in (RefreshOutcome.REFRESHED, RefreshOutcome.LOGGED_IN)
        status, _, body = answer
        envelope = json.loads(body)
        # Only a 2xx answer whose body does not contradict it, naming this user (or no one), with a pair.
        assert 200 <= status < 300
        assert envelope.get("Status") in (None, *range(200, 300))
        named = {k.lower(): v for k, v in envelope["Result"].items()}.get("devicetoken")
        assert named is None or str(named).lower() == str(USER)
        assert after.access_token
        assert after.refresh_token
        assert after.access_expires_at is not None
        assert after.access_expires_at >= NOW
    else:
        assert after.status in (UserStatus.ACTIVE, UserStatus.NEEDS_RELOGIN)
    produced = [*logs.lines, after.last_error or "", *(json.dumps(e.detail()) for e in world.publisher.events)]
    assert leaks(produced, SECRETS) == []


def test_refresh_never_stores_a_pair_issued_for_another_user() -> None:
    INPUTS("refresh worker answer")
    world = new_world()
    world.clock.now = NOW
    stored = _stored_user(world)
    refresher = TokenRefresher(
        upstream=_client(), store=world.store, credentials=world.credentials, publisher=world.publisher,
        margin_seconds=600, timing=TIMING, clock=world.clock, sleep=world.clock.sleep,
    )  # fmt: skip
    other = str(uuid.uuid4())
    answer = {"Result": {"DeviceToken": other, "AccessToken": {"Token": jwt({"DeviceToken": other}), "ExpiresIn": 60},
                         "RefreshToken": "someone-else's"}}  # fmt: skip
    with upstream_answering((200, {}, json.dumps(answer).encode())):
        refresher.refresh_job(RefreshJob(str(USER), 1))
    after = world.store.get_user(str(USER))
    assert after is not None
    assert (after.access_token, after.refresh_token) == (stored.access_token, stored.refresh_token)


@pytest.mark.parametrize("status", [302, 403, 409])
def test_refresh_worker_defers_an_answer_it_does_not_expect(status: int) -> None:
    INPUTS("refresh worker answer")
    world = new_world()
    world.clock.now = NOW
    _stored_user(world)
    refresher = TokenRefresher(
        upstream=_client(), store=world.store, credentials=world.credentials, publisher=world.publisher,
        margin_seconds=600, timing=TIMING, clock=world.clock, sleep=world.clock.sleep,
    )  # fmt: skip
    with upstream_answering((status, {}, b"{}")):
        outcome = refresher.refresh_job(RefreshJob(str(USER), 1))
    assert outcome in (RefreshOutcome.DEFERRED, RefreshOutcome.NEEDS_RELOGIN)


def test_a_login_error_quoting_the_users_tokens_is_not_repeated() -> None:
    INPUTS("refresh worker answer")
    world = new_world()
    world.clock.now = NOW
    # Tokens not shaped like real ones, so that the suite-wide log guard does not trip over this known defect.
    world.store.claim_registration(
        device_token=str(USER), instance="default", instance_id=str(CREDS.instance_id), client_id="c-1",
        owner="o", now=NOW - 3600, ttl=120,
    )  # fmt: skip
    stored = Tokens(access_token="stored-access-token-0001", refresh_token="stored-refresh-token-0001", expires_at=NOW)
    world.store.complete_registration(device_token=str(USER), owner="o", tokens=stored, now=NOW - 3600)
    refresher = TokenRefresher(
        upstream=_client(), store=world.store, credentials=StaticCredentials({"default": CREDS}),
        publisher=world.publisher, margin_seconds=600, timing=TIMING, clock=world.clock, sleep=world.clock.sleep,
    )  # fmt: skip
    quoting = json.dumps({"Status": 403, "Title": f"{stored.access_token} / {stored.refresh_token}"}).encode()
    with upstream_answering((400, {}, quoting), login=(403, {}, quoting)):
        refresher.refresh_job(RefreshJob(str(USER), 1))
    after = world.store.get_user(str(USER))
    assert after is not None
    produced = [after.last_error or "", *(json.dumps(e.detail()) for e in world.publisher.events)]
    assert leaks(produced, [stored.access_token, stored.refresh_token]) == []
