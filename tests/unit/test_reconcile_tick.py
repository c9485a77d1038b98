"""A reconcile wake-up without an admin session ends early and says so; it never fails the invocation (a failed
scheduled invocation is retried by Lambda and then dead-lettered, while the next wake-up goes on from the cursor)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from telematics_reg.errors import LoginDeferredError
from telematics_reg.lifecycle.admin import AdminSessionUnavailableError
from telematics_reg.reconcile.adoption import ChunkAdopter
from telematics_reg.reconcile.audit import AuditStep, DriftAudit
from telematics_reg.reconcile.service import Reconciler


class _Adopter:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def adopt_pending(self, **_: Any) -> list[Any]:
        if self.error is not None:
            raise self.error
        return []


class _Audit:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def run(self, **_: Any) -> AuditStep:
        if self.error is not None:
            raise self.error
        return AuditStep("idle")


@pytest.mark.parametrize(
    "error",
    [
        AdminSessionUnavailableError("the admin session is being renewed elsewhere"),
        AdminSessionUnavailableError("admin Login answer lost"),
        LoginDeferredError("the fleet's Login budget is spent"),
    ],
)
@pytest.mark.parametrize("where", ["adoption", "audit"])
def test_a_wake_up_without_an_admin_session_ends_busy_instead_of_failing(error: Exception, where: str) -> None:
    adopter = _Adopter(error if where == "adoption" else None)
    audit = _Audit(error if where == "audit" else None)
    reconciler = Reconciler(adopter=cast(ChunkAdopter, adopter), audit=cast(DriftAudit, audit))

    report = reconciler.tick(time_left=lambda: 60.0)

    assert report.audit is not None
    assert report.audit.status == "busy"
    assert "admin session unavailable" in (report.audit.detail or "")
