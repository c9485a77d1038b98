"""Fault injection: latency, 5xx, 429, hangs and "commit then drop the answer", by rate or by script.

Configured as a whole at start (``EMULATOR_FAULTS``) and patched at run time (``PUT /_emulator/faults``)
with the same JSON shape; keys left out keep their value. Faults apply only to the upstream calls named in
``calls`` (registration, tokens and the User Management API); the admin API is never faulted.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from local.emulator.messages import FieldError

CALLS = (
    "create",
    "create_many",
    "refresh",
    "login",
    # the User Management API
    "find",
    "get_filtered_page",
    "update",
    "delete",
    "change_instance",
)
ERROR = "error"
RATE_LIMIT = "rate_limit"
HANG = "hang"
DROP_AFTER_COMMIT = "drop_after_commit"
FAULT_KINDS = (ERROR, RATE_LIMIT, HANG, DROP_AFTER_COMMIT)


class FaultConfigError(ValueError):
    """The faults JSON is invalid; ``errors`` name each bad key."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{error.key}: {error.message}" for error in errors))
        self.errors = errors


@dataclass(frozen=True)
class ScriptedFault:
    """A one-shot fault for the next call named ``call`` (any call when ``None``)."""

    fault: str
    call: str | None = None
    status: int | None = None
    retry_after_s: float | None = None
    hang_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"call": self.call, "fault": self.fault}
        for name in ("status", "retry_after_s", "hang_s"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data


@dataclass(frozen=True)
class FaultConfig:
    latency_ms: tuple[float, float] = (0.0, 0.0)
    error_rate: float = 0.0
    error_status: int = 503
    rate_limit_rate: float = 0.0
    retry_after_s: float = 1.0
    hang_rate: float = 0.0
    hang_s: float = 30.0
    hang_abandon_if_gone: bool = False
    drop_after_commit_rate: float = 0.0
    calls: frozenset[str] = frozenset(CALLS)
    script: tuple[ScriptedFault, ...] = field(default=())

    def as_json(self) -> dict[str, Any]:
        low, high = self.latency_ms
        return {
            "latency_ms": _number(low) if low == high else [_number(low), _number(high)],
            "error_rate": self.error_rate,
            "error_status": self.error_status,
            "rate_limit_rate": self.rate_limit_rate,
            "retry_after_s": _number(self.retry_after_s),
            "hang_rate": self.hang_rate,
            "hang_s": _number(self.hang_s),
            "hang_abandon_if_gone": self.hang_abandon_if_gone,
            "drop_after_commit_rate": self.drop_after_commit_rate,
            "calls": [call for call in CALLS if call in self.calls],
            "script": [item.as_json() for item in self.script],
        }


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


@dataclass(frozen=True)
class Decision:
    """What to do to one call: sleep ``latency_s`` first, then serve ``fault`` (``None``: behave)."""

    latency_s: float = 0.0
    fault: str | None = None
    status: int = 503
    retry_after_s: float = 1.0
    hang_s: float = 0.0
    abandon_if_gone: bool = False

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` in whole seconds (rounded up), as HTTP wants."""
        return str(math.ceil(self.retry_after_s))


NO_FAULT = Decision()


class _Patch:
    """Reads one faults JSON object (keys already lower-cased), collecting errors per key."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        self.errors: list[FieldError] = []

    def has(self, key: str) -> bool:
        return key in self.data

    def fail(self, key: str, message: str) -> None:
        self.errors.append(FieldError(key, message))

    def number(self, key: str, default: float, *, low: float = 0.0, high: float = math.inf) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            self.fail(key, f"must be a number between {low:g} and {high:g}")
            return default
        return float(value)

    def rate(self, key: str, default: float) -> float:
        return self.number(key, default, low=0.0, high=1.0)

    def status(self, key: str, default: int) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
            self.fail(key, "must be an HTTP status between 400 and 599")
            return default
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, "must be true or false")
            return default
        return value

    def latency(self, default: tuple[float, float]) -> tuple[float, float]:
        if not self.has("latency_ms"):
            return default
        value = self.data["latency_ms"]
        if value is None:
            return (0.0, 0.0)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return (float(value), float(value))
        if (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(bound, int | float) and not isinstance(bound, bool) for bound in value)
            and 0 <= value[0] <= value[1]
        ):
            return (float(value[0]), float(value[1]))
        self.fail("latency_ms", "must be a number of milliseconds >= 0 or [min, max] with 0 <= min <= max")
        return default

    def calls(self, default: frozenset[str]) -> frozenset[str]:
        value = self.data.get("calls", sorted(default))
        if not isinstance(value, list) or not all(isinstance(call, str) and call in CALLS for call in value):
            self.fail("calls", f"must be a list of calls among {', '.join(CALLS)}")
            return default
        return frozenset(value)

    def script(self, default: tuple[ScriptedFault, ...]) -> tuple[ScriptedFault, ...]:
        value = self.data.get("script", None)
        if not self.has("script"):
            return default
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail("script", "must be a list of {call, fault} objects")
            return default
        items = [self._script_item(index, item) for index, item in enumerate(value)]
        return tuple(item for item in items if item is not None)

    def _script_item(self, index: int, item: Any) -> ScriptedFault | None:
        key = f"script[{index}]"
        if not isinstance(item, dict):
            self.fail(key, "must be an object")
            return None
        call, fault = item.get("call"), item.get("fault")
        if call in ("*", "any"):
            call = None
        if call is not None and call not in CALLS:
            self.fail(f"{key}.call", f"must be one of {', '.join(CALLS)} (or absent for any)")
        if fault not in FAULT_KINDS:
            self.fail(f"{key}.fault", f"must be one of {', '.join(FAULT_KINDS)}")
            return None
        sub = _Patch(item)
        status = sub.status("status", 503) if "status" in item else None
        retry_after = sub.number("retry_after_s", 1.0) if "retry_after_s" in item else None
        hang_s = sub.number("hang_s", 30.0) if "hang_s" in item else None
        self.errors.extend(FieldError(f"{key}.{error.key}", error.message) for error in sub.errors)
        return ScriptedFault(fault=fault, call=call, status=status, retry_after_s=retry_after, hang_s=hang_s)


def apply_patch(current: FaultConfig, data: Any) -> FaultConfig:
    """``current`` with the keys of ``data`` (a folded faults JSON object) applied; raises on any bad key."""
    if not isinstance(data, dict):
        raise FaultConfigError([FieldError("faults", "must be a JSON object")])
    known = {
        "latency_ms",
        "error_rate",
        "error_status",
        "rate_limit_rate",
        "retry_after_s",
        "hang_rate",
        "hang_s",
        "hang_abandon_if_gone",
        "drop_after_commit_rate",
        "calls",
        "script",
        "seed",
    }
    patch = _Patch(data)
    for key in sorted(set(data) - known):
        patch.fail(key, "unknown fault setting")
    updated = replace(
        current,
        latency_ms=patch.latency(current.latency_ms),
        error_rate=patch.rate("error_rate", current.error_rate),
        error_status=patch.status("error_status", current.error_status),
        rate_limit_rate=patch.rate("rate_limit_rate", current.rate_limit_rate),
        retry_after_s=patch.number("retry_after_s", current.retry_after_s),
        hang_rate=patch.rate("hang_rate", current.hang_rate),
        hang_s=patch.number("hang_s", current.hang_s),
        hang_abandon_if_gone=patch.flag("hang_abandon_if_gone", current.hang_abandon_if_gone),
        drop_after_commit_rate=patch.rate("drop_after_commit_rate", current.drop_after_commit_rate),
        calls=patch.calls(current.calls),
        script=patch.script(current.script),
    )
    if "seed" in data and (isinstance(data["seed"], bool) or not isinstance(data["seed"], int)):
        patch.fail("seed", "must be an integer")
    if patch.errors:
        raise FaultConfigError(patch.errors)
    return updated


class FaultInjector:
    """Thread-safe holder of the fault configuration; decides the fault for each call."""

    def __init__(self, initial: Any = None) -> None:
        self._lock = threading.Lock()
        self._random = random.Random()
        self._config = FaultConfig()
        if initial is not None:
            self.update(initial)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._config.as_json()

    def update(self, data: Any) -> dict[str, Any]:
        """Patch the configuration (see :func:`apply_patch`); ``"seed"`` re-seeds the random draws."""
        with self._lock:
            self._config = apply_patch(self._config, data)
            if isinstance(data, dict) and data.get("seed") is not None:
                self._random.seed(data["seed"])
            return self._config.as_json()

    def clear(self) -> None:
        with self._lock:
            self._config = FaultConfig()

    def decide(self, call: str) -> Decision:
        """The fault for one ``call``: the first matching scripted fault (consumed), else by the rates."""
        with self._lock:
            config = self._config
            in_scope = call in config.calls
            low, high = config.latency_ms
            latency_s = self._random.uniform(low, high) / 1000.0 if in_scope and high > 0 else 0.0
            for index, item in enumerate(config.script):
                if item.call is None or item.call == call:
                    self._config = replace(config, script=config.script[:index] + config.script[index + 1 :])
                    return Decision(
                        latency_s=latency_s,
                        fault=item.fault,
                        status=item.status if item.status is not None else config.error_status,
                        retry_after_s=(item.retry_after_s if item.retry_after_s is not None else config.retry_after_s),
                        hang_s=item.hang_s if item.hang_s is not None else config.hang_s,
                        abandon_if_gone=config.hang_abandon_if_gone,
                    )
            if not in_scope:
                return NO_FAULT
            draw = self._random.random()
            fault: str | None = None
            threshold = 0.0
            for kind, rate in (
                (ERROR, config.error_rate),
                (RATE_LIMIT, config.rate_limit_rate),
                (HANG, config.hang_rate),
                (DROP_AFTER_COMMIT, config.drop_after_commit_rate),
            ):
                threshold += rate
                if draw < threshold:
                    fault = kind
                    break
            return Decision(
                latency_s=latency_s,
                fault=fault,
                status=config.error_status,
                retry_after_s=config.retry_after_s,
                hang_s=config.hang_s,
                abandon_if_gone=config.hang_abandon_if_gone,
            )
