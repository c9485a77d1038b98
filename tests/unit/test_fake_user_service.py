"""The fake User Service answers the admin session and the management calls as the real client does."""

from __future__ import annotations

from uuid import uuid4

import pytest

from local.fakes import FakeUserService
from telematics_reg.errors import DeadRefreshTokenError, ForbiddenError, UnauthorizedError, UpstreamValidationError
from telematics_reg.management_models import AdminCredentials, UserPageQuery, UserUpdate, UserUpdateFields
from telematics_reg.models import CreateUserRequest, InstanceCredentials, UserFields
from telematics_reg.upstream import iter_user_pages

A = InstanceCredentials(instance_id=uuid4(), instance_key="0a0a0a0a-0000-4000-8000-00000000000a")
B = InstanceCredentials(instance_id=uuid4(), instance_key="0b0b0b0b-0000-4000-8000-00000000000b")
WRONG_B = InstanceCredentials(instance_id=B.instance_id, instance_key="0e0e0e0e-0000-4000-8000-00000000000e")
ADMIN = AdminCredentials(email="ops@example.com", password="pw")


class Clock:
    now = 1_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def fake() -> FakeUserService:
    return FakeUserService(instances=[A, B], admin=ADMIN, clock=Clock())


def test_admin_session_rotates_and_checks_credentials(fake: FakeUserService) -> None:
    session = fake.admin_login(ADMIN)
    with pytest.raises(UnauthorizedError):
        fake.admin_login(AdminCredentials(email="ops@example.com", password="wrong"))

    renewed = fake.admin_refresh(session.access_token.token, session.refresh_token)

    with pytest.raises(DeadRefreshTokenError):
        fake.admin_refresh(session.access_token.token, session.refresh_token)
    assert fake.find_users(renewed.access_token.token, client_id="nobody") == []


def test_management_calls(fake: FakeUserService) -> None:
    token = fake.admin_login(ADMIN).access_token.token
    users = [fake.create(A, CreateUserRequest(user_fields=UserFields(client_id=f"c-{n}"))) for n in range(5)]
    first = users[0].device_token

    fake.update_user(
        token,
        first,
        UserUpdate(
            first_name="Ada", status="Deactivated", user_fields=UserUpdateFields(enable_tracking=False, client_id="new")
        ),
    )
    (found,) = fake.find_users(token, client_id="new")
    assert (found.device_token, found.active, found.flags.enable_tracking) == (first, False, False)
    assert found.user_profile is not None
    assert found.user_profile.first_name == "Ada"

    pages = list(iter_user_pages(fake, token, UserPageQuery(page_size=2, show_inactive_users=False)))
    assert [len(page.users) for page in pages] == [2, 2]
    assert first not in {user.device_token for page in pages for user in page.users}

    with pytest.raises(UpstreamValidationError):
        fake.change_instance(token, first, WRONG_B)
    fake.change_instance(token, first, B)
    assert fake.find_users(token, device_token=first)[0].instance_id == B.instance_id

    fake.delete_user(token, first)
    fake.delete_user(token, first)  # already gone: done
    assert fake.find_users(token, device_token=first) == []
    assert fake.calls["delete_user"] == 2


def test_a_user_token_is_forbidden_and_no_token_unauthorized(fake: FakeUserService) -> None:
    user = fake.create(A, CreateUserRequest())
    assert user.access_token is not None

    with pytest.raises(ForbiddenError):
        fake.find_users(user.access_token.token, device_token=user.device_token)
    with pytest.raises(UnauthorizedError):
        fake.find_users("not-a-jwt", device_token=user.device_token)
