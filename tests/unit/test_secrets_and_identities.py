"""The security review's promises, against in-memory fakes: a malformed InstanceKey never leaks, DeviceTokens
cannot be computed without the stack's key (and changing how they are derived never doubles a user), and an
unknown instance alias never discloses the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from local.fake_store import InMemoryTokenStore
from local.fakes import FakeUserService, StaticDeviceTokenKey
from telematics_reg.credentials import (
    CredentialsConfigError,
    DeviceTokenKey,
    SecretsManagerCredentials,
    SecretsManagerDeviceTokenKey,
    StaticCredentials,
)
from telematics_reg.errors import RetryLaterError, TelematicsError, UnknownInstanceError
from telematics_reg.intake import RegistrationIntake
from telematics_reg.models import CreateUserRequest, UserFields
from telematics_reg.outcomes import RegistrationFailed
from telematics_reg.registration import RegistrationService, bulk_device_tokens, device_token_for

from .conftest import DEVICE_TOKEN_KEY, World

# The namespace the UUIDv5 DeviceTokens were derived under before they were keyed (it was in the source).
LEGACY_NAMESPACE = uuid.UUID("6f6b1c1e-5d0a-4c3e-9a57-2f1d8e4b7a10")
INSTANCE_ID = "3c1c8fd7-4133-404a-82e9-93a015d85362"
GOOD_KEY = "1b7cc25f-329e-4482-9dd1-0bb07c0c794b"


class SecretsClient:
    """The one Secrets Manager call Powertools makes, answered from a dict of secret id -> value."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.calls = 0

    def get_secret_value(self, SecretId: str, **_: Any) -> dict[str, str]:
        self.calls += 1
        return {"SecretString": self.values[SecretId]}


def _service(
    world: World,
    *,
    credentials: Any = None,
    key: Any = DEVICE_TOKEN_KEY,
    store: Any = None,
    upstream: Any = None,
) -> RegistrationIntake:
    service = RegistrationService(
        upstream=upstream or world.upstream,
        store=store or world.store,
        credentials=credentials or world.credentials,
        device_token_key=key,
        publisher=world.publisher,
        clock=world.clock,
        sleep=world.clock.sleep,
    )
    return RegistrationIntake(service=service, dead_letters=world.dead_letters, publisher=world.publisher)


# --- defect 7: a malformed InstanceKey ------------------------------------------------------------------------


@pytest.mark.parametrize("malformed", [GOOD_KEY + "\n", GOOD_KEY + " ", "\t" + GOOD_KEY, "not-a-uuid"])
def test_a_malformed_key_in_the_secret_fails_only_its_alias_and_is_never_quoted(malformed: str) -> None:
    client = SecretsClient(
        {
            "arn:credentials": json.dumps(
                {
                    "default": {"InstanceId": INSTANCE_ID, "InstanceKey": GOOD_KEY},
                    "broken": {"InstanceId": str(uuid.uuid4()), "InstanceKey": malformed},
                }
            )
        }
    )
    credentials = SecretsManagerCredentials("arn:credentials", client=client)

    assert credentials.get("default").instance_key.get_secret_value() == GOOD_KEY
    with pytest.raises(CredentialsConfigError) as caught:
        credentials.get("broken")

    assert str(caught.value) == "credentials secret: instance 'broken' is invalid (InstanceKey)"
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ or caught.value.__context__ is None
    assert malformed.strip() not in repr(caught.value)


class _LeakyStore(InMemoryTokenStore):
    """A store whose SDK fails with an exception quoting a secret (as requests' InvalidHeader does)."""

    def find_by_client(self, instance: str, client_id: str) -> Any:
        raise ValueError(f"Invalid header value b'{GOOD_KEY}\\n'")


class _BrokenCredentials:
    def get(self, alias: str) -> Any:
        raise CredentialsConfigError("credentials secret is not valid JSON")

    def invalidate(self) -> None:
        pass


def test_a_foreign_exception_is_retried_under_a_safe_text_without_its_chain(world: World) -> None:
    intake = _service(world, store=_LeakyStore())

    with pytest.raises(RetryLaterError) as caught:
        intake.handle({"ClientId": "c-1"}, message_id="m-1", source="signup")

    assert str(caught.value) == "registration will be retried: ValueError"
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None  # raised outside the except block: no chain to the original at all


def test_this_librarys_own_errors_still_propagate_as_they_are(world: World) -> None:
    intake = _service(world, credentials=_BrokenCredentials())

    with pytest.raises(CredentialsConfigError):
        intake.handle({"ClientId": "c-2"}, message_id="m-2", source="queue")


# --- defect 8: keyed DeviceTokens -----------------------------------------------------------------------------


def test_a_device_token_cannot_be_computed_from_the_instance_id_and_client_id_alone() -> None:
    key = DEVICE_TOKEN_KEY.get()
    token = uuid.UUID(device_token_for(INSTANCE_ID, "customer-42", key=key))

    # Not the published-namespace UUIDv5 anyone could compute...
    assert token != uuid.uuid5(LEGACY_NAMESPACE, f"{INSTANCE_ID}/client/customer-42")
    for name in (f"{INSTANCE_ID}/client/customer-42", f"{INSTANCE_ID}customer-42", "customer-42"):
        for namespace in (LEGACY_NAMESPACE, uuid.UUID(INSTANCE_ID), uuid.NAMESPACE_OID, uuid.NAMESPACE_URL):
            assert token not in (uuid.uuid5(namespace, name), uuid.uuid3(namespace, name))
    # ...but a keyed one: deterministic under the key, different under any other.
    assert str(token) == device_token_for(INSTANCE_ID.upper(), "customer-42", key=key)
    assert str(token) != device_token_for(INSTANCE_ID, "customer-42", key=DeviceTokenKey("another-key-" + "x" * 32))
    assert str(token) != device_token_for(INSTANCE_ID, "customer-43", key=key)
    assert (token.version, token.variant) == (8, uuid.RFC_4122)
    bulk = bulk_device_tokens(INSTANCE_ID, "req-1", 100, 3, key=key)
    assert bulk == bulk_device_tokens(INSTANCE_ID, "req-1", 100, 3, key=key)
    assert len(set(bulk)) == 3
    assert all((t.version, t.variant) == (8, uuid.RFC_4122) for t in bulk)
    assert bulk[0] != uuid.uuid5(LEGACY_NAMESPACE, f"{INSTANCE_ID}/bulk/req-1/100")


def test_device_tokens_are_registered_with_the_key_from_its_secret(world: World) -> None:
    client = SecretsClient({"arn:key": "k" * 64})
    intake = _service(world, key=SecretsManagerDeviceTokenKey("arn:key", client=client))

    result = intake.handle({"ClientId": "c-1"}, message_id="m-1", source="queue")
    intake.handle({"ClientId": "c-2"}, message_id="m-2", source="queue")

    expected = device_token_for(str(world.creds.instance_id), "c-1", key=DeviceTokenKey("k" * 64))
    assert result.device_token == expected
    assert client.calls == 1  # cached


@pytest.mark.parametrize("value", ["short", "k" * 40 + "\n", " " + "k" * 40, "k" * 20 + " " + "k" * 20])
def test_a_malformed_device_token_key_is_refused_without_being_quoted(world: World, value: str) -> None:
    intake = _service(world, key=SecretsManagerDeviceTokenKey("arn:key", client=SecretsClient({"arn:key": value})))

    with pytest.raises(CredentialsConfigError) as caught:
        intake.handle({"ClientId": "c-1"}, message_id="m-1", source="queue")

    assert value.strip() not in str(caught.value)
    assert sum(world.upstream.calls.values()) == 0
    assert repr(DeviceTokenKey("k" * 32)) == "DeviceTokenKey(***)"


def _legacy_user(world: World, client_id: str, *, complete: bool) -> str:
    """A user registered before DeviceTokens were keyed: UUIDv5 token, upstream and (claimed or stored) here."""
    instance_id = str(world.creds.instance_id)
    legacy = str(uuid.uuid5(LEGACY_NAMESPACE, f"{instance_id.lower()}/client/{client_id}"))
    world.upstream.create(
        world.creds, CreateUserRequest(custom_token=uuid.UUID(legacy), user_fields=UserFields(client_id=client_id))
    )
    world.store.claim_registration(
        device_token=legacy,
        instance="default",
        instance_id=instance_id,
        client_id=client_id,
        owner="legacy-delivery",
        now=world.clock(),
        ttl=120,
    )
    if complete:
        world.store.complete_registration(device_token=legacy, owner="legacy-delivery", tokens=None, now=world.clock())
    return legacy


def test_given_a_user_registered_before_keyed_tokens_when_redelivered_then_it_is_the_same_user(world: World) -> None:
    legacy = _legacy_user(world, "c-legacy", complete=True)

    result = world.intake.handle({"ClientId": "c-legacy"}, message_id="m-again", source="queue")

    assert result.status == "duplicate"
    assert result.device_token == legacy
    assert len(world.upstream.users_of(world.creds.instance_id, "c-legacy")) == 1


def test_given_a_legacy_claim_whose_holder_died_after_create_then_the_takeover_reuses_its_device_token(
    world: World,
) -> None:
    # The old code claimed, its Create committed upstream, then it died: the claim expires with no stored user.
    legacy = _legacy_user(world, "c-crashed", complete=False)
    world.clock.now += 121

    result = world.intake.handle({"ClientId": "c-crashed"}, message_id="m-redelivered", source="queue")

    assert result.status == "registered"
    assert result.device_token == legacy  # the same CustomToken: the upstream answers "exists", Login recovers
    assert len(world.upstream.users_of(world.creds.instance_id, "c-crashed")) == 1
    record = world.store.get_user(legacy)
    assert record is not None
    assert record.tokens is not None


def test_given_a_new_key_then_registered_users_keep_their_tokens_and_new_ones_get_keyed_tokens(world: World) -> None:
    first = world.intake.handle({"ClientId": "c-1"}, message_id="m-1", source="queue")
    rotated = _service(world, key=StaticDeviceTokenKey("a-different-key-" + "z" * 32))

    again = rotated.handle({"ClientId": "c-1"}, message_id="m-1-again", source="queue")
    new = rotated.handle({"ClientId": "c-9"}, message_id="m-9", source="queue")

    assert again.status == "duplicate"
    assert again.device_token == first.device_token
    assert len(world.upstream.users_of(world.creds.instance_id, "c-1")) == 1
    assert new.device_token == device_token_for(
        str(world.creds.instance_id), "c-9", key=DeviceTokenKey("a-different-key-" + "z" * 32)
    )


def test_a_stored_user_of_another_instance_under_the_same_alias_is_not_reused(world: World) -> None:
    # An alias pointed at a new instance: a ClientId of the old instance is a new user of the new one.
    first = world.intake.handle({"ClientId": "c-moved"}, message_id="m-1", source="queue")
    other = world.creds.model_copy(update={"instance_id": uuid.uuid4()})
    upstream = FakeUserService(instances=[world.creds, other], clock=world.clock)
    moved = _service(world, credentials=StaticCredentials({"default": other}), upstream=upstream)

    result = moved.handle({"ClientId": "c-moved"}, message_id="m-2", source="queue")

    assert result.status == "registered"
    assert result.device_token != first.device_token


# --- defect 9: other aliases are never disclosed ----------------------------------------------------------------


@pytest.mark.parametrize("source", ["queue", "signup"])
def test_an_unknown_instance_is_dead_lettered_and_announced_without_naming_the_other_instances(
    world: World, source: str
) -> None:
    other = world.creds.model_copy(update={"instance_id": uuid.uuid4()})
    credentials = StaticCredentials({"default": world.creds, "fleet-hidden-eu": other, "zz-partner-acme": other})
    intake = _service(world, credentials=credentials)

    result = intake.handle({"ClientId": "c-1", "Instance": "nowhere"}, message_id="m-1", source=source)  # type: ignore[arg-type]

    assert result.status == "dead_lettered"
    (letter,) = world.dead_letters.letters
    (event,) = world.publisher.of_type(RegistrationFailed)
    published = json.dumps(event.detail())
    stored = json.dumps([letter.body, letter.reason, letter.detail()])
    assert letter.reason == "unknown_instance"
    assert "nowhere" in published
    for alias in ("default", "fleet-hidden-eu", "zz-partner-acme"):
        assert alias not in published
        assert alias not in stored


def test_the_unknown_instance_error_names_only_the_alias_asked_for() -> None:
    client = SecretsClient(
        {"arn:credentials": json.dumps({"fleet-hidden-eu": {"InstanceId": INSTANCE_ID, "InstanceKey": GOOD_KEY}})}
    )
    for credentials in (
        SecretsManagerCredentials("arn:credentials", client=client),
        StaticCredentials({"fleet-hidden-eu": {"InstanceId": INSTANCE_ID, "InstanceKey": GOOD_KEY}}),
    ):
        with pytest.raises(UnknownInstanceError) as caught:
            credentials.get("nowhere")
        assert isinstance(caught.value, TelematicsError)
        assert "fleet-hidden-eu" not in str(caught.value)
        assert [e.message for e in caught.value.errors] == ["no credentials for instance 'nowhere'"]


# Traces come from Lambda's active tracing, without the X-Ray SDK: nothing patches requests to record the text of an
# exception it raises. What is left to check is that text itself, and that no module of the path loads the SDK
# (a fresh interpreter: a test of this session may have imported it).
_UPSTREAM_ERRORS_SCRIPT = """
import json, sys, uuid
from pydantic import SecretStr
from telematics_reg.models import CreateUserRequest, InstanceCredentials
from telematics_reg.upstream import UserServiceClient

key = sys.argv[1]
client = UserServiceClient("http://127.0.0.1:9", max_attempts=1, connect_timeout=0.2)
good = InstanceCredentials(instance_id=uuid.uuid4(), instance_key=key)
bad = InstanceCredentials.model_construct(instance_id=uuid.uuid4(), instance_key=SecretStr(key + "\\n"))
texts = []
for creds in (good, bad):
    try:
        client.create(creds, CreateUserRequest())
    except Exception as exc:
        print(type(exc).__name__, file=sys.stderr)
        chain = exc
        while chain is not None:
            texts.append(repr(chain))
            chain = chain.__cause__ or chain.__context__
print(json.dumps({"texts": texts, "xray": any(name.startswith("aws_xray_sdk") for name in sys.modules)}))
"""


def test_a_malformed_key_never_reaches_an_error_text_and_no_tracing_sdk_is_loaded() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", _UPSTREAM_ERRORS_SCRIPT, GOOD_KEY],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )

    report = json.loads(completed.stdout)
    assert report["xray"] is False
    assert report["texts"]  # both calls failed (nothing listens on port 9)
    assert not [text for text in report["texts"] if GOOD_KEY in text]
    assert completed.stderr.split() == ["TransientUpstreamError", "RequestNotSentError"]
