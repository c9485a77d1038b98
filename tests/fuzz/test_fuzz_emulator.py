"""The User Service emulator's request parsing: whatever the request, the answer is a well-formed 2xx or 4xx,
never a 500 nor a dropped connection (with no fault configured).

The routing and parsing are exercised in-process (:class:`App`, fast); the HTTP front once more over a socket
with hostile request lines, headers and bodies.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from local.emulator.app import App
from local.emulator.faults import FaultInjector
from local.emulator.server import EmulatorServer
from local.emulator.state import AdminAccount, EmulatorState, Instance, RuntimeConfig
from local.emulator.tokens import TokenIssuer, new_jwt_secret

from .conftest import INPUTS, scaled
from .strategies import any_json, hostile_text, registration_like

INSTANCE = Instance("default", "3c1c8fd7-4133-404a-82e9-93a015d85362", "fuzz-instance-key")
ROUTES = [
    ("POST", "/v1/Registration/Create"),
    ("POST", "/v1/Registration/CreateMany"),
    ("POST", "/v1/Auth/RefreshToken"),
    ("POST", "/v1/RefreshToken"),
    ("POST", "/v1/Auth/Login"),
    ("GET", "/v1/Check/UserExists?ClientId=c-1"),
    ("PUT", "/v1/Management/users"),
    ("DELETE", "/v1/Management/users/6d3f8f1e-2f4b-4a53-8d51-3b1b0c2d9e77"),
    ("PUT", "/_emulator/faults"),
    ("PUT", "/_emulator/config"),
    ("POST", "/_emulator/revoke"),
    ("POST", "/_emulator/login-disabled"),
    ("GET", "/_emulator/users/%00"),
]


def _app() -> App:
    issuer = TokenIssuer(new_jwt_secret())
    state = EmulatorState(
        [INSTANCE], issuer, RuntimeConfig(token_lifetime_s=3600), AdminAccount("ops@example.com", "fuzz-admin-password")
    )
    return App(state, FaultInjector(), issuer)


def _jwt_like(claims: Any) -> str:
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    payload = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    return f"{part(b'{}')}.{part(payload)}.sig"


request_bodies = st.one_of(
    registration_like.map(lambda v: json.dumps(v).encode()),
    any_json.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"LoginFields": any_json | any_json.map(json.dumps) | st.just("[" * 5000), "Password": any_json}
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"AccessToken": hostile_text | st.builds(_jwt_like, any_json), "RefreshToken": any_json}).map(
        lambda v: json.dumps(v).encode()
    ),
    st.binary(max_size=80),
    st.integers(min_value=900, max_value=20_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.sampled_from([b"", b"\xff\xfe{\x00}\x00", b'{"Quantity": 1e999}', b"1" * 5000, b'{"a": NaN}']),
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "InstanceId": st.sampled_from([INSTANCE.instance_id, INSTANCE.instance_id.upper()]) | hostile_text,
        "InstanceKey": st.just(INSTANCE.instance_key) | hostile_text,
        "Authorization": st.one_of(
            hostile_text, st.builds(lambda c: "Bearer " + _jwt_like(c), any_json), st.just("Bearer ")
        ),
        "Content-Type": st.sampled_from(["application/json", "text/plain", ""]),
    },
)
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
targets = st.one_of(
    st.sampled_from(ROUTES),
    st.tuples(st.sampled_from(METHODS), st.sampled_from([path for _, path in ROUTES])),
    st.tuples(st.just("GET"), hostile_text.map(lambda t: "/v1/Check/UserExists?" + t)),
    st.tuples(st.just("POST"), hostile_text.map(lambda t: "/" + t)),
)  # fmt: skip


@given(target=targets, headers=headers, body=request_bodies)
@example(target=ROUTES[0], headers={"InstanceId": INSTANCE.instance_id, "InstanceKey": INSTANCE.instance_key},
         body=b"[" * 5000 + b"]" * 5000)  # fmt: skip
@example(target=ROUTES[4], headers={}, body=json.dumps({"LoginFields": "[" * 5000 + "]" * 5000}).encode())
@example(target=("POST", "//["), headers={}, body=b"{}")
@example(target=ROUTES[8], headers={}, body=b'{"a":' * 3000 + b"1" + b"}" * 3000)
def test_any_request_gets_a_4xx_or_2xx_never_a_500(
    target: tuple[str, str], headers: dict[str, str], body: bytes
) -> None:
    INPUTS("emulator request")
    method, path = target
    outcome = _app().handle(method, path, headers, body)

    assert not outcome.drop
    assert outcome.reply is not None
    reply = outcome.reply
    assert 200 <= reply.status < 500, reply.payload
    json.dumps(reply.payload)  # what the server sends must be JSON
    for name, value in reply.headers.items():
        (f"{name}: {value}").encode("latin-1")
        assert "\r" not in value
        assert "\n" not in value


# --- the HTTP front ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    running = EmulatorServer(("127.0.0.1", 0), _app())
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    yield running
    running.shutdown()
    running.server_close()


raw_requests = st.one_of(
    st.builds(
        lambda line, head, body: line + b"\r\n" + head + b"\r\n\r\n" + body,
        st.sampled_from([b"POST /v1/Registration/Create HTTP/1.1", b"GET / HTTP/1.1", b"POST /v1/Auth/Login HTTP/1.0"]),
        st.sampled_from(
            [
                b"Content-Length: 5",
                b"Content-Length: -1",
                b"Content-Length: x",
                b"Content-Length: 99999999",
                b"Transfer-Encoding: chunked",
                b"Content-Length: 0\r\nContent-Length: 4",
                b"X: \xff",
            ]
        ),
        st.binary(max_size=40),
    ),
    st.binary(min_size=1, max_size=120).map(lambda b: b + b"\r\n\r\n"),
)


@settings(max_examples=scaled(15))
@given(request=raw_requests)
@example(request=b"POST /v1/Auth/Login HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
def test_the_http_front_never_answers_5xx(server: EmulatorServer, request: bytes) -> None:
    INPUTS("emulator raw request")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass  # waiting for a body it was promised: no answer is not a 500
    if answer.startswith(b"HTTP/"):
        status = int(answer.split(b" ", 2)[1])
        assert status < 500, answer[:300]
