"""Where output goes and how it looks: results on stdout (a rich table, or JSON for scripts), diagnostics and
progress on stderr, and tokens redacted everywhere unless the operator explicitly asks to see them.

Everything printed is data from outside (a ClientId, a dead letter's body, an upstream's error text), so no
terminal control gets through: the consoles drop C0/C1 control characters and the ESC/OSC sequences they start
(Rich itself passes ESC through), and JSON output escapes them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from rich.console import Console, ConsoleOptions, RenderableType
from rich.segment import Segment
from rich.text import Text

ELLIPSIS: Final = "…"
_SHOWN_PREFIX: Final = 6
#: Keys whose values are secrets (compared case-insensitively): redacted in every listing.
SECRET_KEYS: Final = frozenset({"accesstoken", "refreshtoken", "token", "instancekey", "password", "authorization"})
_JWT: Final = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


# Terminal controls in text: whole escape sequences first (CSI; OSC, DCS, SOS, PM, APC up to their terminator),
# then any ESC with the character after it, then every other C0 control but tab and newline, DEL and C1.
_TERMINAL_CONTROL: Final = re.compile(
    r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)"
    r"|\x1b[\x20-\x7e]?"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
)
# A lone surrogate (a file name that is not UTF-8, say) cannot be written to a UTF-8 terminal at all.
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")
# What JSON output must escape beyond what json.dumps does (it escapes C0 only).
_JSON_UNESCAPED_CONTROL: Final = re.compile(r"[\x7f-\x9f\ud800-\udfff]")


def clean(text: str) -> str:
    """``text`` without terminal controls: C0 (but tab and newline), DEL, C1, and ESC/OSC sequences whole.

    Example
    -------
    >>> clean("c-1\x1b]0;owned\x07\x1b[2J\x9b31m!")
    'c-1!'
    """
    return _SURROGATE.sub("\ufffd", _TERMINAL_CONTROL.sub("", text))


class SafeConsole(Console):
    """A Rich console that never sends a control character of the data it prints to the terminal.

    Text is cleaned before markup is parsed (so widths are right) and again, segment by segment, as it is
    rendered (so a ``Text`` or any renderable built from data is covered too); Rich's own control segments
    (colours, cursor moves of a progress bar) are left alone.
    """

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(clean(text), **kwargs)

    def render(self, renderable: RenderableType, options: ConsoleOptions | None = None) -> Iterable[Segment]:
        for segment in super().render(renderable, options):
            if segment.control is None and (_TERMINAL_CONTROL.search(segment.text) or _SURROGATE.search(segment.text)):
                yield Segment(clean(segment.text), segment.style)
            else:
                yield segment


def stdout() -> Console:
    """The console for results (follows ``sys.stdout`` at call time, so redirection and capture work)."""
    return SafeConsole(highlight=False, soft_wrap=False)


def stderr() -> Console:
    """The console for diagnostics and progress."""
    return SafeConsole(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    stderr().print(f"[yellow]warning:[/yellow] {escape(message)}")


def info(message: str) -> None:
    stderr().print(escape(message))


def escape(text: str) -> str:
    """Text shown literally by rich (``[...]`` is markup otherwise)."""
    return text.replace("[", r"\[")


def print_json(data: Any) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False, default=_json_default)
    # DEL, C1 and lone surrogates can only be inside strings here: escaped, the JSON (and its values) is the same.
    text = _JSON_UNESCAPED_CONTROL.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
    sys.stdout.write(text + "\n")
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
