"""Start-up configuration from the environment and the command line (flags win over variables)."""

from __future__ import annotations

import argparse
import json
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from local.emulator.login_limit import VENDOR_BLOCK_S, VENDOR_LIMIT_PER_MINUTE
from local.emulator.state import AdminAccount, Instance
from local.emulator.tokens import new_jwt_secret

DEFAULT_PORT = 8081


class SettingsError(ValueError):
    """The configuration is unusable; the message says which setting and why."""


@dataclass(frozen=True)
class Settings:
    port: int
    instances: tuple[Instance, ...]
    instances_generated: bool
    token_lifetime_s: int | None
    """None: the documented lifetimes (Create 432000 s, Login and Refresh 86400 s)."""
    faults: Any
    jwt_secret: str
    verbose: bool
    admin: AdminAccount
    admin_generated: bool
    login_limit_per_minute: int = VENDOR_LIMIT_PER_MINUTE
    login_block_s: int = VENDOR_BLOCK_S

    def login_limit_line(self) -> str:
        """How the Login limit stands against the vendor's, for the start-up output."""
        vendor = f"the vendor's: {VENDOR_LIMIT_PER_MINUTE} a minute, then {VENDOR_BLOCK_S} s"
        if self.login_limit_per_minute == 0:
            return f"login limit: OFF (relaxed; {vendor})"
        mine = f"{self.login_limit_per_minute} Logins a minute per source address, then 429 for {self.login_block_s} s"
        if (self.login_limit_per_minute, self.login_block_s) == (VENDOR_LIMIT_PER_MINUTE, VENDOR_BLOCK_S):
            return f"login limit: {mine} (the vendor's)"
        laxer = self.login_limit_per_minute > VENDOR_LIMIT_PER_MINUTE or self.login_block_s < VENDOR_BLOCK_S
        return f"login limit: {mine} ({'relaxed' if laxer else 'stricter'}; {vendor})"


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


def parse_admin(document: Any) -> AdminAccount:
    """The admin account from ``{"Email": ..., "Password": ...}`` (keys case-insensitive)."""
    folded = {str(key).lower(): value for key, value in document.items()} if isinstance(document, dict) else {}
    email, password = folded.get("email"), folded.get("password")
    if not isinstance(email, str) or "@" not in email.strip():
        raise SettingsError('admin: Email must be an e-mail address ({"Email": "...", "Password": "..."})')
    if not isinstance(password, str) or not password:
        raise SettingsError("admin: Password must be a non-empty string")
    return AdminAccount(email.strip(), password)


def generated_admin() -> AdminAccount:
    return AdminAccount("admin@emulator.invalid", secrets.token_urlsafe(18))


def admin_json(admin: AdminAccount) -> dict[str, str]:
    return {"Email": admin.email, "Password": admin.password}


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
    parser.add_argument(
        "--token-lifetime",
        type=int,
        help="every access token's lifetime, s (env EMULATOR_TOKEN_LIFETIME; default: the documented ones)",
    )
    parser.add_argument("--admin", help='admin account {"Email", "Password"} JSON or @file (env EMULATOR_ADMIN)')
    parser.add_argument(
        "--login-limit-per-minute",
        type=int,
        help=f"Logins a minute per source address, 0 = off (env EMULATOR_LOGIN_LIMIT_PER_MINUTE; "
        f"default {VENDOR_LIMIT_PER_MINUTE}, the vendor's)",
    )
    parser.add_argument(
        "--login-block-s",
        type=int,
        help=f"how long an address is refused Login after exceeding it, s (env EMULATOR_LOGIN_BLOCK_S; "
        f"default {VENDOR_BLOCK_S})",
    )
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
    if lifetime is None and environ.get("EMULATOR_TOKEN_LIFETIME"):
        lifetime = _int(environ["EMULATOR_TOKEN_LIFETIME"], "EMULATOR_TOKEN_LIFETIME")
    if lifetime is not None and lifetime < 1:
        raise SettingsError("the token lifetime must be at least 1 second")

    admin_text = args.admin or environ.get("EMULATOR_ADMIN")
    if admin_text:
        admin, admin_generated = parse_admin(_read_json(admin_text, "admin")), False
    else:
        admin, admin_generated = generated_admin(), True

    limit = args.login_limit_per_minute
    if limit is None:
        limit = _int(
            environ.get("EMULATOR_LOGIN_LIMIT_PER_MINUTE", str(VENDOR_LIMIT_PER_MINUTE)),
            "EMULATOR_LOGIN_LIMIT_PER_MINUTE",
        )
    block = args.login_block_s
    if block is None:
        block = _int(environ.get("EMULATOR_LOGIN_BLOCK_S", str(VENDOR_BLOCK_S)), "EMULATOR_LOGIN_BLOCK_S")
    if limit < 0:
        raise SettingsError("the Login limit must be 0 (off) or more calls a minute")
    if block < 1:
        raise SettingsError("the Login block must last at least 1 second")

    faults_text = args.faults or environ.get("EMULATOR_FAULTS")
    return Settings(
        port=port,
        instances=instances,
        instances_generated=generated,
        token_lifetime_s=lifetime,
        faults=_read_json(faults_text, "faults") if faults_text else None,
        jwt_secret=environ.get("EMULATOR_JWT_SECRET") or new_jwt_secret(),
        verbose=args.verbose or environ.get("EMULATOR_VERBOSE", "") in {"1", "true", "yes"},
        admin=admin,
        admin_generated=admin_generated,
        login_limit_per_minute=limit,
        login_block_s=block,
    )
