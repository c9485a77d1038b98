"""Start-up configuration from the environment and the command line (flags win over variables)."""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from local.emulator.state import Instance
from local.emulator.tokens import new_jwt_secret

DEFAULT_PORT = 8081
DEFAULT_TOKEN_LIFETIME_S = 7200


class SettingsError(ValueError):
    """The configuration is unusable; the message says which setting and why."""


@dataclass(frozen=True)
class Settings:
    port: int
    instances: tuple[Instance, ...]
    instances_generated: bool
    token_lifetime_s: int
    faults: Any
    jwt_secret: str
    verbose: bool


def _read_json(text: str, what: str) -> Any:
    """JSON from ``text``, or from the file it names when it starts with ``@``."""
    source = what
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        source = f"{what} file {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"cannot read {source}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def parse_instances(document: Any) -> tuple[Instance, ...]:
    """Instances from the credentials-secret format ``{"alias": {"InstanceId": ..., "InstanceKey": ...}}``."""
    if not isinstance(document, dict) or not document:
        raise SettingsError('instances must be a non-empty JSON object {"alias": {"InstanceId", "InstanceKey"}}')
    instances = []
    seen: set[str] = set()
    for alias, entry in document.items():
        folded = {str(key).lower(): value for key, value in entry.items()} if isinstance(entry, dict) else {}
        instance_id, instance_key = folded.get("instanceid"), folded.get("instancekey")
        if not isinstance(instance_id, str) or not instance_id.strip():
            raise SettingsError(f"instance {alias!r}: InstanceId must be a non-empty string")
        if not isinstance(instance_key, str) or not instance_key.strip():
            raise SettingsError(f"instance {alias!r}: InstanceKey must be a non-empty string")
        if instance_id.strip().lower() in seen:
            raise SettingsError(f"instance {alias!r}: InstanceId {instance_id} is used twice")
        seen.add(instance_id.strip().lower())
        # The key is kept exactly as given: the same JSON becomes the service's credentials secret in local runs,
        # and a malformed key (say, with a trailing newline) must reach the service's client as it is, not be
        # quietly repaired here.
        instances.append(Instance(alias, instance_id.strip(), instance_key))
    return tuple(instances)


def generated_instances() -> tuple[Instance, ...]:
    return (Instance("default", str(uuid.uuid4()), str(uuid.uuid4())),)


def instances_json(instances: Sequence[Instance]) -> dict[str, dict[str, str]]:
    return {
        instance.alias: {"InstanceId": instance.instance_id, "InstanceKey": instance.instance_key}
        for instance in instances
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m local.emulator", description="User Service emulator")
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (env PORT; 0 = any free port)")
    parser.add_argument("--instances", help="credentials JSON or @file (env EMULATOR_INSTANCES)")
    parser.add_argument("--token-lifetime", type=int, help="access token lifetime, s (env EMULATOR_TOKEN_LIFETIME)")
    parser.add_argument("--faults", help="faults JSON or @file, as PUT /_emulator/faults (env EMULATOR_FAULTS)")
    parser.add_argument("--verbose", action="store_true", help="log every request (env EMULATOR_VERBOSE=1)")
    return parser


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, not {value!r}") from None


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    args = _parser().parse_args(list(argv))
    port = args.port if args.port is not None else _int(environ.get("PORT", str(DEFAULT_PORT)), "PORT")
    if not 0 <= port <= 65535:
        raise SettingsError(f"port {port} is out of range")

    instances_text = args.instances or environ.get("EMULATOR_INSTANCES")
    if not instances_text and environ.get("EMULATOR_INSTANCES_FILE"):
        instances_text = "@" + environ["EMULATOR_INSTANCES_FILE"]
    if instances_text:
        instances, generated = parse_instances(_read_json(instances_text, "instances")), False
    else:
        instances, generated = generated_instances(), True

    lifetime = args.token_lifetime
    if lifetime is None:
        lifetime = _int(
            environ.get("EMULATOR_TOKEN_LIFETIME", str(DEFAULT_TOKEN_LIFETIME_S)), "EMULATOR_TOKEN_LIFETIME"
        )
    if lifetime < 1:
        raise SettingsError("the token lifetime must be at least 1 second")

    faults_text = args.faults or environ.get("EMULATOR_FAULTS")
    return Settings(
        port=port,
        instances=instances,
        instances_generated=generated,
        token_lifetime_s=lifetime,
        faults=_read_json(faults_text, "faults") if faults_text else None,
        jwt_secret=environ.get("EMULATOR_JWT_SECRET") or new_jwt_secret(),
        verbose=args.verbose or environ.get("EMULATOR_VERBOSE", "") in {"1", "true", "yes"},
    )
