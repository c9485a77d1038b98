"""Finding the service's resources: from a deployed CloudFormation stack, or from the local stack of ``make run``.

Never from URLs copied by hand: a deployed stack is read with ``DescribeStacks`` (its Outputs name the table, the
queues and the bus; its Parameters give the tuning), and the local stack is the JSON file ``make run`` saves
(``.local-stack/stack.json``: the moto endpoint, the region, the outputs and every function's environment).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, ProfileNotFound

from telematics_cli.errors import CliError
from telematics_cli.output import warn
from telematics_reg.settings import insecure_url_problem

DEFAULT_LOCAL_STACK: Final = Path(".local-stack/stack.json")
#: moto accepts any credentials; real ones are never sent to a local endpoint.
LOCAL_CREDENTIALS: Final = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "aws_session_token": "testing",
}


@dataclass
class Target:
    """The resources of one deployment of the service, and clients to reach them."""

    description: str
    region: str
    session: boto3.session.Session
    endpoint_url: str | None
    outputs: Mapping[str, str]
    parameters: Mapping[str, str]
    #: The functions' environment variables (the local stack records them; a deployed stack gives parameters).
    environment: Mapping[str, str]
    #: What to tell the operator when the endpoint cannot be reached.
    unreachable_hint: str
    local: bool = False
    #: The deployed stack's name, or the local stack's saved description (the folder of its log file).
    stack_name: str | None = None
    local_path: Path | None = None
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def client(self, service: str) -> Any:
        """A boto3 client of this target (cached; boto3 clients are thread-safe once created)."""
        with self._lock:
            if service not in self._clients:
                config = Config(
                    retries={"mode": "standard", "max_attempts": 5},
                    max_pool_connections=32,
                    connect_timeout=5,
                    read_timeout=30,
                )
                self._clients[service] = self.session.client(service, endpoint_url=self.endpoint_url, config=config)
            return self._clients[service]

    def output(self, name: str) -> str:
        """A stack output, or a clear error naming the missing output."""
        value = self.outputs.get(name)
        if not value:
            raise CliError(
                f"{self.description} has no output {name!r} (outputs: {', '.join(sorted(self.outputs)) or 'none'}); "
                "was it deployed from this project's template.yaml?"
            )
        return value

    def setting(self, env: str, parameter: str | None = None, default: str | None = None) -> str | None:
        """A configuration value: the functions' environment variable, else the template parameter, else default."""
        if self.environment.get(env):
            return self.environment[env]
        if parameter and self.parameters.get(parameter):
            return self.parameters[parameter]
        return default

    def int_setting(self, env: str, parameter: str | None, default: int) -> int:
        value = self.setting(env, parameter)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise CliError(f"{env} of {self.description} is not a number: {value!r}") from None


def resolve(
    *, stack: str | None, region: str | None, profile: str | None, local: bool, local_stack: str | None
) -> Target:
    """The target the options name: ``--stack`` (CloudFormation), else the local stack (``--local``,
    ``--local-stack PATH``, or ``.local-stack/stack.json`` when it exists)."""
    if stack and (local or local_stack):
        raise CliError("give either --stack (a deployed stack) or --local/--local-stack (the local one), not both")
    if stack:
        return from_cloudformation(stack, region=region, profile=profile)
    path = Path(local_stack) if local_stack else find_local_stack()
    if local or local_stack or path.exists():
        return from_local(path)
    raise CliError(
        "no stack to work on: give --stack NAME for a deployed stack (with --region/--profile as needed), "
        f"or start the local stack with `make run ARGS=--serve` (it saves {DEFAULT_LOCAL_STACK} while it runs), "
        "or point at a saved one with --local-stack PATH"
    )


def find_local_stack(start: Path | None = None) -> Path:
    """``.local-stack/stack.json`` in the current folder or the nearest parent that has one (as git finds .git);
    the current folder's path when there is none."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / DEFAULT_LOCAL_STACK
        if candidate.is_file():
            return candidate
    return DEFAULT_LOCAL_STACK


def from_local(path: Path) -> Target:
    """The local stack saved by ``make run`` (``LocalStack.save``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(
            f"no local stack at {path}: start it with `make run ARGS=--serve` (it saves {DEFAULT_LOCAL_STACK} while "
            "it runs), or give --stack NAME for a deployed stack"
        ) from None
    except OSError as exc:
        raise CliError(f"cannot read the local stack file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
        endpoint_url = str(data["endpoint_url"])
        region = str(data["region"])
        outputs = {str(k): str(v) for k, v in dict(data["outputs"]).items()}
    except (ValueError, KeyError, TypeError):
        raise CliError(f"{path} is not a local stack file (expected endpoint_url, region and outputs)") from None
    parameters = {str(k): str(v) for k, v in dict(data.get("parameters") or {}).items()}
    environment: dict[str, str] = {}
    for function in dict(data.get("functions") or {}).values():
        for key, value in dict(function.get("environment") or {}).items():
            environment.setdefault(str(key), str(value))
    session = boto3.session.Session(region_name=region, **LOCAL_CREDENTIALS)
    return Target(
        description=f"the local stack {data.get('stack_name', '')!s} ({path})".replace("  ", " "),
        region=region,
        session=session,
        endpoint_url=endpoint_url,
        outputs=outputs,
        parameters=parameters,
        environment=environment,
        unreachable_hint=f"is the local stack still running? `make run ARGS=--serve` starts it ({path} may be stale)",
        local=True,
        local_path=path,
    )


def from_cloudformation(name: str, *, region: str | None, profile: str | None) -> Target:
    """A deployed stack, read with ``DescribeStacks``."""
    try:
        session = boto3.session.Session(profile_name=profile, region_name=region)
    except ProfileNotFound:
        raise CliError(f"AWS profile {profile!r} is not configured (see `aws configure list-profiles`)") from None
    resolved_region = session.region_name
    if not resolved_region:
        raise CliError("no AWS region: give --region, or set AWS_REGION or a region in the profile")
    known = {
        region
        for partition in session.get_available_partitions()
        for region in session.get_available_regions("cloudformation", partition_name=partition)
    }
    if known and resolved_region not in known:
        raise CliError(f"unknown AWS region {resolved_region!r} (e.g. {', '.join(sorted(known)[:6])}, …)")
    target = Target(
        description=f"stack {name!r} in {resolved_region}",
        region=resolved_region,
        session=session,
        endpoint_url=None,
        outputs={},
        parameters={},
        environment={},
        unreachable_hint=f"is {resolved_region!r} a valid region, and is the network up?",
        stack_name=name,
    )
    try:
        stacks = target.client("cloudformation").describe_stacks(StackName=name)["Stacks"]
    except ClientError as exc:
        error = exc.response.get("Error", {})
        if error.get("Code") == "ValidationError" and "does not exist" in str(error.get("Message", "")):
            raise CliError(
                f"stack {name!r} does not exist in {resolved_region} "
                "(wrong --region or --profile? `aws cloudformation list-stacks` shows what there is)"
            ) from None
        raise
    described: dict[str, Any] = stacks[0]
    status = str(described.get("StackStatus", ""))
    if not status.endswith("_COMPLETE") or "ROLLBACK" in status or status.startswith("DELETE"):
        warn(f"stack {name!r} is {status}: its outputs may be missing or stale")
    target.outputs = {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}
    target.parameters = {
        p["ParameterKey"]: p.get("ResolvedValue") or p.get("ParameterValue", "")
        for p in described.get("Parameters", [])
    }
    return target


def secure_user_service_url(url: str) -> str:
    """``url`` (from --user-service-url or the stack) if InstanceKeys and tokens may be sent to it: https, or plain
    http only to this machine (a local emulator)."""
    problem = insecure_url_problem(url)
    if problem is not None:
        raise CliError(f"User Service URL {url}: {problem}")
    return url
