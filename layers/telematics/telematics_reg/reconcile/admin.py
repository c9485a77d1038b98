"""The admin JWT the reconcile flow lists users with, behind one small interface.

:class:`AdminTokenSource` is all the reconcile flow asks of an admin session: run a management call with a live
admin JWT, and renew it once when the upstream refuses it (401). The fleet's one admin session,
:class:`telematics_reg.lifecycle.admin.FleetAdminSession` (stored encrypted in the tokens table, renewed under a
lease, its Login within the fleet's budget), is the implementation: an audit and the lifecycle share it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from pydantic import SecretStr

_T = TypeVar("_T")


class AdminTokenSource(Protocol):
    """A live admin JWT for management calls.

    Example
    -------
    >>> page = admin.call(lambda token: upstream.users_page(token, query))  # doctest: +SKIP
    """

    def call(self, request: Callable[[SecretStr], _T]) -> _T:
        """Run ``request`` with the admin JWT; on a 401, renew the session once and run it again."""
        ...
