"""Run the emulator as a subprocess from tests and benchmarks.

Example
-------
    from local.emulator.testing import running_emulator

    with running_emulator(token_lifetime=2, faults={"latency_ms": 20}) as emulator:
        requests.post(f"{emulator.url}/v1/Registration/Create", headers=emulator.headers(), json={})
        assert emulator.counters()["creates"] == 1
        emulator.set_faults(script=[{"call": "create", "fault": "drop_after_commit"}])
        emulator.reset()   # users, tokens, counters and faults cleared; config back to its start values

Each call starts a fresh process (``sys.executable -m local.emulator`` on a free port); nothing is shared
between two emulators, so tests may run them side by side (pytest-xdist included).

The Login limit is the vendor's unless the caller relaxes it, and then it must say why
(``login_limit_reason`` / :meth:`EmulatorHandle.relax_login_limit`): every relaxation is recorded in
:func:`login_limit_relaxations`, which the test suite prints in its summary and the scripts print in their output.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from local.emulator.login_limit import VENDOR_BLOCK_S, VENDOR_LIMIT_PER_MINUTE
from local.emulator.tokens import new_jwt_secret

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING = "listening on "
INSTANCES = "instances: "
ADMIN = "admin: "
LOGIN_LIMIT = "login limit: "
InstancesJson = dict[str, dict[str, str]]

_relaxations: list[str] = []
_relaxations_lock = threading.Lock()


def is_laxer_than_the_vendor(per_minute: int | None, block_s: int | None) -> bool:
    """Whether a Login limit lets through what the vendor's (5 a minute, then an hour's block) would refuse."""
    limit = VENDOR_LIMIT_PER_MINUTE if per_minute is None else per_minute
    block = VENDOR_BLOCK_S if block_s is None else block_s
    return limit == 0 or limit > VENDOR_LIMIT_PER_MINUTE or block < VENDOR_BLOCK_S


def _record_relaxation(per_minute: int | None, block_s: int | None, reason: str | None) -> None:
    if not is_laxer_than_the_vendor(per_minute, block_s):
        return
    if not reason or not reason.strip():
        raise ValueError("relaxing the emulator's Login limit below the vendor's needs a reason (it is reported)")
    limit = "off" if per_minute == 0 else f"{per_minute if per_minute is not None else VENDOR_LIMIT_PER_MINUTE}/min"
    block = f", block {block_s} s" if block_s is not None else ""
    with _relaxations_lock:
        _relaxations.append(f"Login limit {limit}{block}: {reason.strip()}")


def login_limit_relaxations() -> list[str]:
    """Every relaxation of the Login limit made in this process so far (what and why), oldest first."""
    with _relaxations_lock:
        return list(_relaxations)


class EmulatorError(RuntimeError):
    """The emulator did not start, or an admin call failed."""


@dataclass
class EmulatorHandle:
    """A running emulator: its ``url``, the ``instances`` it serves and helpers for its admin API."""

    url: str
    instances: InstancesJson
    admin_account: dict[str, str] | None = None
    """The admin account ``{"Email", "Password"}`` (given at start, or the one the emulator generated)."""
    login_limit_line: str = ""
    """The emulator's own statement of its Login limit against the vendor's (printed at start)."""
    jwt_secret: str | None = None
    """The HS256 secret (set when started by :func:`running_emulator`), to verify tokens in tests."""
    process: subprocess.Popen[str] | None = None
    admin_timeout_s: float = 10.0
    _output: deque[str] = field(default_factory=lambda: deque(maxlen=1000))
    _sessions: list[requests.Session] = field(default_factory=list)
    _local: threading.local = field(default_factory=threading.local)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def attach(cls, url: str, instances: InstancesJson) -> EmulatorHandle:
        """A handle on an emulator started elsewhere (e.g. ``make emulator``); ``close()`` it when done."""
        return cls(url=url.rstrip("/"), instances=instances)

    # ------------------------------------------------------------------ credentials

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def instance_id(self, alias: str = "default") -> str:
        return self.instances[alias]["InstanceId"]

    def instance_key(self, alias: str = "default") -> str:
        return self.instances[alias]["InstanceKey"]

    def headers(self, alias: str = "default") -> dict[str, str]:
        """The ``InstanceId`` + ``InstanceKey`` headers of instance ``alias``."""
        return {"InstanceId": self.instance_id(alias), "InstanceKey": self.instance_key(alias)}

    def admin_login_body(self) -> dict[str, str]:
        """The documented admin Login body: ``LoginFields`` a JSON string of ``{"email"}``, ``Password``."""
        if self.admin_account is None:
            raise EmulatorError("the admin account of this emulator is not known")
        return {
            "LoginFields": json.dumps({"email": self.admin_account["Email"]}),
            "Password": self.admin_account["Password"],
        }

    def output(self) -> list[str]:
        """The last lines the process printed (stdout and stderr), for diagnosing a failure."""
        return list(self._output)

    # ------------------------------------------------------------------ admin API

    @property
    def _session(self) -> requests.Session:
        """A pooled session per thread (the admin helpers may be called from any thread)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """Call ``/_emulator{path}`` and return its JSON; raises :class:`EmulatorError` unless 2xx."""
        response = self._session.request(method, f"{self.url}/_emulator{path}", json=body, timeout=self.admin_timeout_s)
        if not response.ok:
            raise EmulatorError(f"{method} /_emulator{path} -> {response.status_code}: {response.text}")
        return response.json()

    def health(self) -> bool:
        return bool(self.admin("GET", "/health").get("ok"))

    def counters(self) -> dict[str, Any]:
        result: dict[str, Any] = self.admin("GET", "/counters")
        return result

    def reset(self) -> None:
        """Clear users, tokens, counters and faults; the config returns to its start values."""
        self.admin("POST", "/reset")

    def faults(self) -> dict[str, Any]:
        result: dict[str, Any] = self.admin("GET", "/faults")
        return result

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Patch the faults (keys as in ``PUT /_emulator/faults``); returns the whole fault config."""
        result: dict[str, Any] = self.admin("PUT", "/faults", faults)
        return result

    def clear_faults(self) -> dict[str, Any]:
        return self.set_faults(
            latency_ms=0,
            error_rate=0,
            rate_limit_rate=0,
            hang_rate=0,
            drop_after_commit_rate=0,
            script=[],
        )

    def config(self) -> dict[str, Any]:
        result: dict[str, Any] = self.admin("GET", "/config")
        return result

    def set_config(self, **config: Any) -> dict[str, Any]:
        """Patch ``token_lifetime_s``, ``create_many_enabled``, ``refresh_paths``, ``login_limit_per_minute``,
        ``login_block_s``; returns the config. A Login limit laxer than the vendor's goes through
        :meth:`relax_login_limit`, which says why."""
        if is_laxer_than_the_vendor(config.get("login_limit_per_minute"), config.get("login_block_s")):
            raise ValueError("use relax_login_limit(..., why=...) to make the Login limit laxer than the vendor's")
        result: dict[str, Any] = self.admin("PUT", "/config", config)
        return result

    def relax_login_limit(self, per_minute: int, *, why: str, block_s: int | None = None) -> dict[str, Any]:
        """Make the Login limit laxer than the vendor's (0: off) until the next :meth:`reset`, and record why."""
        _record_relaxation(per_minute, block_s, why)
        body: dict[str, Any] = {"login_limit_per_minute": per_minute}
        if block_s is not None:
            body["login_block_s"] = block_s
        result: dict[str, Any] = self.admin("PUT", "/config", body)
        return result

    def revoke(self, device_tokens: list[str] | None = None, fraction: float | None = None) -> list[str]:
        """Revoke the current refresh token of these users (or of a fraction of all); returns who."""
        if (device_tokens is None) == (fraction is None):
            raise ValueError("give exactly one of device_tokens and fraction")
        body: dict[str, Any] = {"fraction": fraction} if fraction is not None else {"DeviceTokens": device_tokens}
        revoked: list[str] = self.admin("POST", "/revoke", body)["revoked"]
        return revoked

    def disable_login(self, device_tokens: list[str], *, disabled: bool = True) -> list[str]:
        """Make Login answer 401 for these users (``disabled=False`` undoes it); returns the users found."""
        answer = self.admin("POST", "/login-disabled", {"DeviceTokens": device_tokens, "disabled": disabled})
        changed: list[str] = answer["login_disabled" if disabled else "login_enabled"]
        return changed

    def user(self, device_token: str) -> dict[str, Any] | None:
        """The user's record (profile, InstanceId, ClientId, CreatedAt, ...), or ``None`` if unknown."""
        response = self._session.get(f"{self.url}/_emulator/users/{device_token}", timeout=self.admin_timeout_s)
        if response.status_code == 404:
            return None
        if not response.ok:
            raise EmulatorError(f"GET /_emulator/users/{device_token} -> {response.status_code}: {response.text}")
        result: dict[str, Any] = response.json()
        return result

    def users(self, *, client_id: str | None = None, instance_id: str | None = None) -> list[dict[str, Any]]:
        """All users, or those of a ClientId and/or InstanceId."""
        params = {key: value for key, value in (("ClientId", client_id), ("InstanceId", instance_id)) if value}
        response = self._session.get(f"{self.url}/_emulator/users", params=params, timeout=self.admin_timeout_s)
        if not response.ok:
            raise EmulatorError(f"GET /_emulator/users -> {response.status_code}: {response.text}")
        users: list[dict[str, Any]] = response.json()["users"]
        return users

    def close(self) -> None:
        """Close the admin sessions (the process itself is stopped by :func:`running_emulator`)."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()


def _child_environment(
    instances: InstancesJson | None,
    token_lifetime: int | None,
    faults: Mapping[str, Any] | None,
    jwt_secret: str,
    extra: Mapping[str, str] | None,
    admin: Mapping[str, str] | None = None,
    login_limit: tuple[int | None, int | None] = (None, None),
) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("EMULATOR_") and key != "PORT"  # hermetic: only what the caller asked for
    }
    env.update(
        PORT="0",
        PYTHONUNBUFFERED="1",
        EMULATOR_EXIT_ON_STDIN_EOF="1",
        EMULATOR_JWT_SECRET=jwt_secret,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    if instances is not None:
        env["EMULATOR_INSTANCES"] = json.dumps(instances)
    if token_lifetime is not None:
        env["EMULATOR_TOKEN_LIFETIME"] = str(token_lifetime)
    if faults is not None:
        env["EMULATOR_FAULTS"] = json.dumps(faults)
    if admin is not None:
        env["EMULATOR_ADMIN"] = json.dumps(dict(admin))
    per_minute, block_s = login_limit
    if per_minute is not None:
        env["EMULATOR_LOGIN_LIMIT_PER_MINUTE"] = str(per_minute)
    if block_s is not None:
        env["EMULATOR_LOGIN_BLOCK_S"] = str(block_s)
    env.update(extra or {})
    return env


def _pump(stream: Any, lines: deque[str], startup: queue.Queue[str | None]) -> None:
    """Copy the child's output into ``lines`` until it closes, so its pipe never fills.

    Lines up to ``listening on`` also go to ``startup``; ``None`` there marks the end of the output.
    """
    starting = True
    for line in stream:
        text = line.rstrip("\n")
        lines.append(text)
        if starting:
            startup.put(text)
            starting = not text.startswith(LISTENING)
    startup.put(None)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextlib.contextmanager
def running_emulator(
    instances: InstancesJson | None = None,
    token_lifetime: int | None = None,
    faults: Mapping[str, Any] | None = None,
    *,
    jwt_secret: str | None = None,
    env: Mapping[str, str] | None = None,
    verbose: bool = False,
    startup_timeout_s: float = 20.0,
    admin: Mapping[str, str] | None = None,
    login_limit_per_minute: int | None = None,
    login_block_s: int | None = None,
    login_limit_reason: str | None = None,
) -> Iterator[EmulatorHandle]:
    """Start ``python -m local.emulator`` on a free port; yield its handle; stop it on exit.

    ``instances`` is the credentials JSON (``{"default": {"InstanceId", "InstanceKey"}, ...}``); when
    ``None`` the emulator generates a ``default`` instance and the handle reads it from its output; ``admin``
    (``{"Email", "Password"}``) likewise. ``token_lifetime`` (s; default: the documented lifetimes) and
    ``faults`` (as ``PUT /_emulator/faults``) set the start values. The Login limit is the vendor's unless
    ``login_limit_per_minute`` (0: off) / ``login_block_s`` relax it, which needs ``login_limit_reason``.
    """
    _record_relaxation(login_limit_per_minute, login_block_s, login_limit_reason)
    secret = jwt_secret or new_jwt_secret()
    command = [sys.executable, "-m", "local.emulator", *(["--verbose"] if verbose else [])]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=_child_environment(
            instances, token_lifetime, faults, secret, env, admin, (login_limit_per_minute, login_block_s)
        ),
        stdin=subprocess.PIPE,  # the emulator exits when this closes, even if we die without cleaning up
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines: deque[str] = deque(maxlen=1000)
    startup: queue.Queue[str | None] = queue.Queue()
    pump = threading.Thread(target=_pump, args=(process.stdout, lines, startup), daemon=True)
    pump.start()
    handle: EmulatorHandle | None = None
    try:
        start = _wait_for_start(startup, lines, startup_timeout_s)
        # Without ``instances`` the emulator prints the ones it generated, unless ``env`` gave it some
        # (EMULATOR_INSTANCES / EMULATOR_INSTANCES_FILE): then the caller knows them and may set them here.
        known = instances if instances is not None else (start.instances or {})
        handle = EmulatorHandle(
            url=start.url,
            instances=known,
            admin_account=dict(admin) if admin is not None else start.admin,
            login_limit_line=start.login_limit_line,
            jwt_secret=secret,
            process=process,
            _output=lines,
        )
        yield handle
    finally:
        if handle is not None:
            handle.close()
        _stop(process)
        pump.join(timeout=5)
        if process.stdout is not None:
            process.stdout.close()


@dataclass
class _Start:
    url: str = ""
    instances: InstancesJson | None = None
    admin: dict[str, str] | None = None
    login_limit_line: str = ""


def _wait_for_start(startup: queue.Queue[str | None], lines: deque[str], timeout_s: float) -> _Start:
    """Read the child's first lines up to ``listening on <url>``; also pick up what it generated and its limit."""
    deadline = time.monotonic() + timeout_s
    start = _Start()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EmulatorError(f"the emulator did not start within {timeout_s} s: {list(lines)}")
        try:
            line = startup.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            raise EmulatorError(f"the emulator exited during start-up: {list(lines)}")
        if line.startswith(INSTANCES):
            start.instances = json.loads(line[len(INSTANCES) :])
        elif line.startswith(ADMIN):
            start.admin = json.loads(line[len(ADMIN) :])
        elif line.startswith(LOGIN_LIMIT):
            start.login_limit_line = line
        elif line.startswith(LISTENING):
            start.url = line[len(LISTENING) :].strip()
            return start
