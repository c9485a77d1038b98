"""Reading a registration file one row at a time (CSV or JSON Lines) and turning each row into the exact message
body that will be sent, validated with the service's own parser.

Nothing here holds the file in memory: rows are produced by a generator over the file's lines, so both passes of
``load`` (validate everything, then send) cost memory for one row at a time, whatever the file's size.

CSV: the header row names registration fields (case-insensitive, as the message contract), nested fields with
dots (``UserFields.EnableTracking``, ``CustomFields.Enabled``); empty cells are left out; a row whose ``Quantity``
cell is filled is a bulk request. Cells are typed by the field they fill (``true``/``false`` for flags, digits
for numbers); anything that does not fit is passed as text so the parser names the field at fault.
JSON Lines: one registration or bulk request (a JSON object) per line; blank lines are skipped.

A bulk row without ``RequestId`` gets ``<sha256 of the file>:<line>``, so sending the same row again (a re-run, a
retry) can never register its users twice: the service keeps bulk progress by RequestId.

A row with an ``Action`` (``Update``, ``Deactivate``, ``Reactivate``, ``Delete``, ``Move``; case-insensitive) is a
lifecycle change, validated with the lifecycle function's own parser and sent to the lifecycle queue; an empty
``Action`` is a registration, as without the column. An unknown ``Action`` makes the row invalid.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Final

from pydantic import BaseModel

from telematics_cli.errors import CliError
from telematics_reg.errors import FieldError, InvalidMessageError
from telematics_reg.lifecycle.changes import parse_change
from telematics_reg.models import BulkRegistrationRequest, RegistrationRequest, parse_registration_message

_HASH_CHUNK: Final = 1 << 20
_TRUE: Final = frozenset({"true", "yes", "y", "t", "1"})
_FALSE: Final = frozenset({"false", "no", "n", "f", "0"})
_INTEGER: Final = re.compile(r"[+-]?\d{1,18}")


class InputFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"


_EXTENSIONS: Final = {".csv": InputFormat.CSV, ".jsonl": InputFormat.JSONL, ".ndjson": InputFormat.JSONL}


def detect_format(path: Path, explicit: str | None) -> InputFormat:
    """``--format`` if given, else the file's extension (.csv, .jsonl, .ndjson)."""
    if explicit:
        return InputFormat(explicit)
    found = _EXTENSIONS.get(path.suffix.lower())
    if found is None:
        raise CliError(f"cannot tell the format of {path.name} from its extension: give --format csv or --format jsonl")
    return found


def open_input(path: Path) -> IO[bytes]:
    """The file opened for reading, or a clear error."""
    try:
        if path.is_dir():
            raise CliError(f"cannot read {path}: it is a directory")
        return path.open("rb")
    except FileNotFoundError:
        raise CliError(f"cannot read {path}: no such file") from None
    except PermissionError:
        raise CliError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_input(path) as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bulk_request_id(sha256: str, line: int) -> str:
    """The RequestId a bulk row without one gets: stable for the same file and line."""
    return f"{sha256}:{line}"


@dataclass(frozen=True)
class Row:
    """One row of the file: the body to send, or why it cannot be sent."""

    line: int
    body: str | None
    errors: list[FieldError] = field(default_factory=list)
    bulk: bool = False
    #: Users a valid bulk row asks for (0 for a single registration).
    quantity: int = 0
    #: Of a valid row: its instance alias, and its ClientId (a registration) or RequestId (a bulk request).
    instance: str = "default"
    client_id: str | None = None
    request_id: str | None = None
    #: A lifecycle change (an ``Action`` row): it goes to the lifecycle queue.
    lifecycle: bool = False

    @property
    def valid(self) -> bool:
        return self.body is not None


class ByteProgress(typing.Protocol):
    """Told how many bytes of the file were read so far."""

    def __call__(self, position: int) -> None: ...


def read_rows(path: Path, fmt: InputFormat, sha256: str, *, progress: ByteProgress | None = None) -> Iterator[Row]:
    """Every row of the file, in order, each validated; ``line`` is the (first) physical line of the row."""
    stream = open_input(path)
    with stream:
        lines = _Lines(stream, progress)
        if fmt is InputFormat.JSONL:
            yield from _jsonl_rows(lines, sha256)
        else:
            yield from _csv_rows(lines, sha256)


class _Lines:
    """Decoded lines of a binary stream, remembering which physical lines were not UTF-8."""

    def __init__(self, stream: IO[bytes], progress: ByteProgress | None) -> None:
        self._stream = stream
        self._progress = progress
        self.number = 0
        self.undecodable: set[int] = set()
        self._read = 0

    def __iter__(self) -> Iterator[str]:
        for raw in self._stream:
            self.number += 1
            self._read += len(raw)
            if self._progress is not None and self.number % 256 == 0:
                self._progress(self._read)
            data = raw[3:] if self.number == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError:
                self.undecodable.add(self.number)
                if len(self.undecodable) > 2000:  # only the lines of the current CSV record matter: stay bounded
                    self.undecodable = {n for n in self.undecodable if n >= self.number - 1000}
                yield data.decode("utf-8", errors="replace")
        if self._progress is not None:
            self._progress(self._read)


_NOT_UTF8: Final = [FieldError("", "not valid UTF-8 text")]


def _validated(line: int, body: str, bulk: bool) -> Row:
    try:
        request = parse_registration_message(body)
    except InvalidMessageError as exc:
        return Row(line, None, list(exc.errors) or [FieldError("", exc.reason)], bulk)
    if isinstance(request, BulkRegistrationRequest):
        return Row(line, body, [], True, request.quantity, request.instance, request_id=request.request_id)
    return Row(line, body, [], False, instance=request.instance, client_id=request.client_id)


def _validated_change(line: int, body: str) -> Row:
    # fallback_ms only fills a missing OccurredAt for validation: load stamps the send time (file order) later.
    try:
        parse_change(body, fallback_ms=0)
    except InvalidMessageError as exc:
        return Row(line, None, list(exc.errors) or [FieldError("", exc.reason)], lifecycle=True)
    return Row(line, body, [], lifecycle=True)


def _action_key(data: dict[str, Any]) -> str | None:
    """The key of the row's ``Action`` (any case), or ``None``."""
    return next((key for key in data if isinstance(key, str) and key.lower() == "action"), None)


def _has_key(data: dict[str, Any], name: str) -> bool:
    return any(isinstance(key, str) and key.lower() == name for key in data)


def _jsonl_rows(lines: _Lines, sha256: str) -> Iterator[Row]:
    for text in lines:
        number = lines.number
        stripped = text.strip()
        if not stripped:
            continue
        if number in lines.undecodable:
            yield Row(number, None, _NOT_UTF8)
            continue
        body = stripped
        bulk = False
        try:
            data = json.loads(stripped)
        except (ValueError, RecursionError):
            data = None  # the parser reports where the JSON breaks (or that it nests too deep)
        action = _action_key(data) if isinstance(data, dict) else None
        if isinstance(data, dict) and action is not None:
            if data[action] not in (None, ""):
                yield _validated_change(number, body)
                continue
            del data[action]  # an empty Action: a registration, as without the key
            body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        if isinstance(data, dict) and _has_key(data, "quantity"):
            bulk = True
            if not _has_key(data, "requestid"):
                data["RequestId"] = bulk_request_id(sha256, number)
                body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        yield _validated(number, body, bulk)


# ------------------------------------------------------------------------------------------------------ CSV


@dataclass(frozen=True)
class _FieldType:
    alias: str
    kind: str  # "bool" | "int" | "str" | "model"
    model: type[BaseModel] | None = None


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types an annotation allows (Annotated and Optional/Union taken apart)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        found: list[Any] = []
        for arg in typing.get_args(annotation):
            found.extend(_unwrap(arg))
        return found
    return [annotation]


def _fields(model: type[BaseModel]) -> dict[str, _FieldType]:
    known: dict[str, _FieldType] = {}
    for name, info in model.model_fields.items():
        alias = info.alias or name
        allowed = [t for t in _unwrap(info.annotation) if t is not type(None)]
        submodel = next((t for t in allowed if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if bool in allowed:
            kind = _FieldType(alias, "bool")
        elif int in allowed:
            kind = _FieldType(alias, "int")
        elif submodel is not None:
            kind = _FieldType(alias, "model", submodel)
        else:
            kind = _FieldType(alias, "str")
        known[alias.lower()] = kind
        known[name.lower()] = kind
    return known


_SINGLE_FIELDS: Final = _fields(RegistrationRequest)
_BULK_FIELDS: Final = _fields(BulkRegistrationRequest)


def _cell_value(kind: _FieldType, cell: str) -> Any:
    """A cell typed for its field; text the field cannot take is passed on for the parser to name."""
    value = cell.strip()
    if kind.kind == "bool":
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
    elif kind.kind == "int":
        if _INTEGER.fullmatch(value):
            return int(value)
    elif kind.kind == "model" and value.startswith("{"):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser recurses
            return cell
    return cell


def _place(target: dict[str, Any], path: list[str], cell: str, fields: dict[str, _FieldType] | None) -> None:
    head, rest = path[0], path[1:]
    kind = fields.get(head.lower()) if fields is not None else None
    key = kind.alias if kind is not None else head
    if not rest:
        target[key] = _cell_value(kind, cell) if kind is not None else cell
        return
    nested_fields = _fields(kind.model) if kind is not None and kind.model is not None else None
    nested = target.setdefault(key, {})
    if not isinstance(nested, dict):  # the same object given whole and by parts: let the parser object
        target[f"{key}.{'.'.join(rest)}"] = cell
        return
    _place(nested, rest, cell, nested_fields)


def place_field(data: dict[str, Any], column: str, value: str) -> None:
    """Set ``column`` (a field name, dotted for nested ones: ``UserFields.EnableTracking``) in ``data`` to ``value``,
    typed as a CSV cell of that column would be."""
    _place(data, [part.strip() for part in column.split(".")], value, _SINGLE_FIELDS)


def _csv_header(header: list[str]) -> list[list[str]]:
    paths: list[list[str]] = []
    seen: set[str] = set()
    for column in header:
        name = column.strip()
        if not name:
            raise _HeaderError("a column of the header row has no name")
        if name.lower() in seen:
            raise _HeaderError(f"column {name!r} is given more than once (names are case-insensitive)")
        seen.add(name.lower())
        paths.append([part.strip() for part in name.split(".")])
    return paths


class _HeaderError(Exception):
    pass


def _csv_rows(lines: _Lines, sha256: str) -> Iterator[Row]:
    reader = csv.reader(iter(lines))
    header: list[list[str]] | None = None
    bulk_index: int | None = None
    previous_end = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield Row(previous_end + 1, None, [FieldError("", f"not valid CSV: {exc}")])
            previous_end = lines.number
            continue
        start, previous_end = previous_end + 1, lines.number
        if not cells or all(not cell.strip() for cell in cells):
            continue
        if any(n in lines.undecodable for n in range(start, previous_end + 1)):
            yield Row(start, None, _NOT_UTF8)
            continue
        if header is None:
            try:
                header = _csv_header(cells)
            except _HeaderError as exc:
                yield Row(start, None, [FieldError("header", str(exc))])
                return
            bulk_index = next((i for i, p in enumerate(header) if len(p) == 1 and p[0].lower() == "quantity"), None)
            continue
        if len(cells) > len(header):
            message = f"the row has {len(cells)} cells but the header has {len(header)} columns"
            yield Row(start, None, [FieldError("", message)])
            continue
        bulk = bulk_index is not None and bulk_index < len(cells) and bool(cells[bulk_index].strip())
        fields = _BULK_FIELDS if bulk else _SINGLE_FIELDS
        data: dict[str, Any] = {}
        for path, cell in zip(header, cells, strict=False):
            if cell.strip():
                _place(data, path, cell, fields)
        if bulk and not _has_key(data, "requestid"):
            data["RequestId"] = bulk_request_id(sha256, start)
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        if _action_key(data) is not None:
            yield _validated_change(start, body)
            continue
        yield _validated(start, body, bulk)
