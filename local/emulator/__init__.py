"""Emulator of the telematics User Service, for local runs, tests and benchmarks.

Run it with ``python -m local.emulator`` (``make emulator``). The contract it follows is
``/work/notes/emulator-spec.md``: the public endpoints of ``UPSTREAM.md`` plus an admin API under
``/_emulator`` (counters, reset, faults, config, revoke, login-disabled, users).

Tests start it as a subprocess through :func:`local.emulator.testing.running_emulator`.
This package is independent of the service's own library (``layers/telematics``).
"""

from __future__ import annotations
