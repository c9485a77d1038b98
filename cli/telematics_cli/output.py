"""Where output goes and how it looks: results on stdout (a rich table, or JSON for scripts), diagnostics and
progress on stderr, and tokens redacted everywhere unless the operator explicitly asks to see them."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from rich.console import Console

ELLIPSIS: Final = "…"
_SHOWN_PREFIX: Final = 6
#: Keys whose values are secrets (compared case-insensitively): redacted in every listing.
SECRET_KEYS: Final = frozenset({"accesstoken", "refreshtoken", "token", "instancekey", "password", "authorization"})
_JWT: Final = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def stdout() -> Console:
    """The console for results (follows ``sys.stdout`` at call time, so redirection and capture work)."""
    return Console(highlight=False, soft_wrap=False)


def stderr() -> Console:
    """The console for diagnostics and progress."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    stderr().print(f"[yellow]warning:[/yellow] {escape(message)}")


def info(message: str) -> None:
    stderr().print(escape(message))


def escape(text: str) -> str:
    """Text shown literally by rich (``[...]`` is markup otherwise)."""
    return text.replace("[", r"\[")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def redact(secret: str) -> str:
    """``eyJhbG…(812 chars)``: enough to tell two tokens apart, never enough to use one."""
    return f"{secret[:_SHOWN_PREFIX]}{ELLIPSIS}({len(secret)} chars)"


def redact_text(text: str) -> str:
    """Every JWT in free text (a message body, an error message) replaced by its redacted form."""
    return _JWT.sub(lambda match: redact(match.group()), text)


def redact_value(value: Any) -> Any:
    """A JSON value with the values of secret keys, and any JWT inside strings, redacted."""
    if isinstance(value, Mapping):
        return {
            key: (
                redact(item)
                if isinstance(key, str) and key.lower() in SECRET_KEYS and isinstance(item, str)
                else redact_value(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact_value(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_body(body: str) -> str:
    """A message body for display: secrets redacted, JSON kept compact."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return redact_text(body)
    return json.dumps(redact_value(parsed), ensure_ascii=False, separators=(",", ":"))


def truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + ELLIPSIS


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def relative(seconds: float) -> str:
    """``in 14m 3s`` for the future, ``2h 5m ago`` for the past."""
    total = int(abs(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if hours:
        parts.append(f"{hours}h")
    if minutes and not days:
        parts.append(f"{minutes}m")
    if not days and not hours:
        parts.append(f"{secs}s")
    text = " ".join(parts)
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def when(epoch: float, now: float) -> str:
    """``2026-11-21T10:15:00Z (in 14m 3s)``."""
    return f"{iso(epoch)} ({relative(epoch - now)})"
