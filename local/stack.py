"""Create the service's resources in a moto server from template.yaml itself.

The template is the only description of the service's infrastructure: :func:`provision` translates it with the
SAM translator (offline), walks the resulting CloudFormation resources in dependency order and creates in moto
what a local run needs (KMS key, tables, queues, the event bus, rules, schedules). Lambda functions are not
created (moto cannot run their code): they are *recorded* as :class:`FunctionSpec` with their environment fully
resolved, so the local runtime can invoke each handler in-process with exactly the configuration Lambda would
give it. Event source mappings, rule targets and schedules are recorded the same way for the local router.

Resource types a local run does not need are listed in :data:`SKIPPED_TYPES` with the reason; any other type
raises :class:`UnsupportedResourceError`, so a resource added to the template is never silently ignored.

Example
-------
    from local import moto_server
    from local.stack import provision

    server = moto_server.start()                        # DynamoDB writes atomic per item, as on AWS
    host, port = server.get_host_and_port()
    credentials = {"default": {"InstanceId": "id", "InstanceKey": "key"}}
    stack = provision(f"http://{host}:{port}", instance_credentials=credentials)
    stack.queue_url("RegistrationQueue")                # http://127.0.0.1:…/123456789012/telematics-local-…
    stack.function_environment("SignupFunction")        # the Lambda environment, pointed at moto
    stack.save(".local-stack/stack.json")               # for the CLI and other processes
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import boto3
import yaml
from samtranslator.model.exceptions import InvalidDocumentException
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import intrinsics_multi_constructor

DEFAULT_STACK_NAME: Final = "telematics-local"
DEFAULT_REGION: Final = "us-east-1"
DEFAULT_ACCOUNT_ID: Final = "123456789012"
DEFAULT_STATE_PATH: Final = Path(".local-stack/stack.json")

#: The template parameter that names the instance-credentials secret (created by :func:`provision`).
SECRET_PARAMETER: Final = "InstanceCredentialsSecretArn"  # noqa: S105 - a parameter's name, not a secret
#: The template parameter that names the admin-credentials secret (created by :func:`provision` unless given).
ADMIN_SECRET_PARAMETER: Final = "AdminCredentialsSecretArn"  # noqa: S105 - a parameter's name, not a secret
#: Template parameters that name an EventBridge bus the service publishes on; the bus must exist locally.
EVENT_BUS_PARAMETERS: Final = ("SignupEventBusName",)
#: Values for the parameters a deployment must choose itself (no Default: the pairing of a stack with its app),
#: used by a local run when they are not given. Locally there is one stack per moto server.
LOCAL_PARAMETER_VALUES: Final[Mapping[str, str]] = MappingProxyType(
    {"SignupEventSource": "customer.app", "OutcomeEventSource": "telematics.registration"}
)

#: Key of the translated template's ``Metadata`` that maps placeholder code URIs back to local folders.
CODE_PATHS_METADATA: Final = "LocalCodePaths"
LOCAL_URI_PREFIX: Final = "s3://local/"

#: Credentials moto accepts; real ones must never reach a local run.
DUMMY_CREDENTIALS: Final[Mapping[str, str]] = MappingProxyType(
    {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing"}
)

#: The managed policies the translator attaches to function roles; looked up here instead of in IAM.
MANAGED_POLICIES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "AWSLambdaBasicExecutionRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
        "AWSXrayWriteOnlyAccess": "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
        "AWSLambdaSQSQueueExecutionRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaSQSQueueExecutionRole",
        "AWSLambdaDynamoDBExecutionRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaDynamoDBExecutionRole",
        "AWSLambdaVPCAccessExecutionRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole",
        "AWSLambdaRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaRole",
        "CloudWatchLambdaInsightsExecutionRolePolicy": (
            "arn:aws:iam::aws:policy/CloudWatchLambdaInsightsExecutionRolePolicy"
        ),
    }
)

#: Resource types recorded but not created locally, each with the reason. Everything else must be handled.
SKIPPED_TYPES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "AWS::IAM::Role": "IAM is not enforced locally (resolved properties kept in LocalStack.roles)",
        "AWS::IAM::Policy": "IAM is not enforced locally",
        "AWS::IAM::ManagedPolicy": "IAM is not enforced locally",
        "AWS::Lambda::Permission": "resource policies are not enforced locally",
        "AWS::Lambda::LayerVersion": "the local runtime imports layer code from its folder (FunctionSpec.layers)",
        "AWS::Lambda::Version": "the local runtime always runs the code on disk",
        "AWS::Lambda::Alias": "the local runtime always runs the code on disk",
        "AWS::CloudWatch::Alarm": "observability only",
        "AWS::CloudWatch::CompositeAlarm": "observability only",
        "AWS::CloudWatch::Dashboard": "observability only",
        "AWS::SNS::Topic": "alarm notifications only",
        "AWS::SNS::Subscription": "alarm notifications only",
        "AWS::SNS::TopicPolicy": "alarm notifications only",
        "AWS::Logs::LogGroup": "handlers log to the local process",
        "AWS::Logs::MetricFilter": "observability only",
    }
)


class LocalStackError(Exception):
    """The template cannot be provisioned locally (bad parameter, unresolvable reference, translation error)."""


class UnsupportedResourceError(LocalStackError):
    """The template has a resource type that is neither provisioned nor deliberately skipped."""


# ---------------------------------------------------------------------------------------------- records


@dataclass
class FunctionSpec:
    """A Lambda function of the template, recorded (not created) so the local runtime can run it in-process."""

    logical_id: str
    name: str
    arn: str
    handler: str
    runtime: str
    #: Absolute path of the function's code folder (its ``CodeUri``); None for inline or image code.
    code_path: str | None
    timeout: int
    memory: int
    #: The ``Environment.Variables`` Lambda would set, every reference resolved to the local resources.
    environment: dict[str, str]
    #: Absolute folders of the template's own layers (``ContentUri``), or the ARN of an external layer.
    layers: list[str] = field(default_factory=list)
    reserved_concurrency: int | None = None


@dataclass
class EventSourceMappingSpec:
    """A Lambda event source mapping (SQS or stream) that the local runtime must poll for itself."""

    logical_id: str
    function: str
    event_source_arn: str
    #: Logical id of the source queue or table of the template, if it is one.
    source_logical_id: str | None
    queue_url: str | None
    batch_size: int
    batching_window: int
    function_response_types: list[str]
    maximum_concurrency: int | None
    enabled: bool = True
    filter_patterns: list[str] = field(default_factory=list)


@dataclass
class RuleTargetSpec:
    """One target of an EventBridge rule.

    moto cannot deliver to Lambda, so for a function target the rule's moto target is an SQS *tap* queue
    (``tap_queue_url``): the local router polls it and invokes ``function`` with each event. moto does not apply
    ``input`` / ``input_path`` either; the router must.
    """

    id: str
    arn: str
    function: str | None
    retry_policy: dict[str, int] | None
    dead_letter_arn: str | None
    input: str | None = None
    input_path: str | None = None
    input_transformer: dict[str, Any] | None = None
    tap_queue_url: str | None = None
    tap_queue_arn: str | None = None


@dataclass
class RuleSpec:
    """An EventBridge rule, created in moto on its bus; a schedule rule is recorded but never fired by moto."""

    logical_id: str
    name: str
    arn: str
    bus: str
    event_pattern: dict[str, Any] | None
    schedule_expression: str | None
    state: str
    targets: list[RuleTargetSpec]


@dataclass
class ScheduleSpec:
    """An EventBridge Scheduler schedule, created in moto (which never fires it) and recorded for the runtime."""

    logical_id: str
    name: str
    group: str
    arn: str
    expression: str
    timezone: str | None
    state: str
    target_arn: str
    function: str | None
    input: str | None
    retry_policy: dict[str, int] | None
    dead_letter_arn: str | None
    flexible_time_window: dict[str, Any]


@dataclass
class LocalStack:
    """The service as provisioned in a moto server: names, URLs and ARNs, and what the local runtime must run.

    Example
    -------
    >>> stack = LocalStack.load(".local-stack/stack.json")  # doctest: +SKIP
    >>> stack.outputs["RegistrationQueueUrl"] == stack.queue_url("RegistrationQueue")  # doctest: +SKIP
    True
    """

    endpoint_url: str
    region: str
    account_id: str
    stack_name: str
    #: Every template parameter with the value used (given or default).
    parameters: dict[str, str]
    outputs: dict[str, str]
    #: Logical id -> physical id (what ``Ref`` gives: table name, queue URL, key id, function name…).
    physical: dict[str, str]
    #: Logical id -> attributes ``Fn::GetAtt`` can read (``Arn``, ``QueueUrl``, ``StreamArn``…).
    attributes: dict[str, dict[str, str]]
    #: Logical id -> resource type, for every resource of the translated template that exists.
    resource_types: dict[str, str]
    functions: dict[str, FunctionSpec]
    event_source_mappings: list[EventSourceMappingSpec]
    rules: list[RuleSpec]
    schedules: list[ScheduleSpec]
    #: Function logical id -> its resolved ``AWS::Lambda::EventInvokeConfig`` properties.
    event_invoke_configs: dict[str, dict[str, Any]]
    #: Role logical id -> resolved properties (policies), kept for inspection; IAM is not enforced locally.
    roles: dict[str, dict[str, Any]]
    #: Logical id -> type of the resources recorded but not created (see :data:`SKIPPED_TYPES`).
    skipped: dict[str, str]
    #: What was approximated (ignored properties, created event buses, tap queues).
    notes: list[str] = field(default_factory=list)

    def queue_url(self, logical_id: str) -> str:
        """URL of a queue of the template.

        Example
        -------
        >>> stack.queue_url("RegistrationQueue")  # doctest: +SKIP
        'http://127.0.0.1:53121/123456789012/telematics-local-RegistrationQueue'
        """
        return self._attribute(logical_id, "QueueUrl", "AWS::SQS::Queue")

    def queue_arn(self, logical_id: str) -> str:
        """ARN of a queue of the template.

        Example
        -------
        >>> stack.queue_arn("RegistrationDeadLetterQueue")  # doctest: +SKIP
        'arn:aws:sqs:us-east-1:123456789012:telematics-local-RegistrationDeadLetterQueue'
        """
        return self._attribute(logical_id, "Arn", "AWS::SQS::Queue")

    def function_environment(self, logical_id: str) -> dict[str, str]:
        """The environment to run a function's handler in-process against this stack.

        The template's variables plus what Lambda itself sets (region, function name) and what makes every
        boto3 client of the handler talk to moto (``AWS_ENDPOINT_URL`` and dummy credentials).
        ``LAMBDA_TASK_ROOT`` is deliberately absent, so Powertools' tracer stays disabled outside Lambda.

        Example
        -------
        >>> env = stack.function_environment("SignupFunction")  # doctest: +SKIP
        >>> env["AWS_ENDPOINT_URL"] == stack.endpoint_url  # doctest: +SKIP
        True
        """
        try:
            spec = self.functions[logical_id]
        except KeyError:
            raise KeyError(
                f"{logical_id} is not a function of the stack (functions: {sorted(self.functions)})"
            ) from None
        return {
            **spec.environment,
            **DUMMY_CREDENTIALS,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_LAMBDA_FUNCTION_NAME": spec.name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        }

    def save(self, path: str | os.PathLike[str] = DEFAULT_STATE_PATH) -> Path:
        """Write the stack as JSON so another process (the CLI, a test runner) can find it.

        Example
        -------
        >>> stack.save(".local-stack/stack.json")  # doctest: +SKIP
        PosixPath('.local-stack/stack.json')
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str] = DEFAULT_STATE_PATH) -> LocalStack:
        """Read a stack written by :meth:`save`.

        Example
        -------
        >>> LocalStack.load(".local-stack/stack.json").endpoint_url  # doctest: +SKIP
        'http://127.0.0.1:53121'
        """
        data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
        data["functions"] = {key: FunctionSpec(**value) for key, value in data["functions"].items()}
        data["event_source_mappings"] = [EventSourceMappingSpec(**value) for value in data["event_source_mappings"]]
        data["rules"] = [
            RuleSpec(**{**rule, "targets": [RuleTargetSpec(**target) for target in rule["targets"]]})
            for rule in data["rules"]
        ]
        data["schedules"] = [ScheduleSpec(**value) for value in data["schedules"]]
        return cls(**data)

    def _attribute(self, logical_id: str, name: str, expected_type: str) -> str:
        actual_type = self.resource_types.get(logical_id)
        if actual_type != expected_type:
            raise KeyError(f"{logical_id} is not an {expected_type} of the stack (it is {actual_type or 'absent'})")
        return self.attributes[logical_id][name]


# ---------------------------------------------------------------------------------------------- template


class _TemplateLoader(yaml.SafeLoader):  # type: ignore[misc, unused-ignore]
    """SafeLoader that reads CloudFormation short tags (``!Ref``, ``!GetAtt``, ``!Sub``…) as intrinsics."""


# Registered on a subclass so the process-wide yaml.SafeLoader is left alone (samtranslator's yaml_parse is not).
_TemplateLoader.add_multi_constructor("!", intrinsics_multi_constructor)


def load_template(path: str | os.PathLike[str] = "template.yaml") -> dict[str, Any]:
    """Parse a CloudFormation/SAM template, short-form intrinsics included.

    Parameters
    ----------
    path
        The template file.

    Returns
    -------
    dict
        The template, with ``!Ref X`` as ``{"Ref": "X"}``, ``!GetAtt A.B`` as ``{"Fn::GetAtt": ["A", "B"]}``.

    Example
    -------
    >>> load_template("template.yaml")["Resources"]["DataKeyAlias"]["Properties"]["TargetKeyId"]  # doctest: +SKIP
    {'Ref': 'DataKey'}
    """
    with Path(path).open(encoding="utf-8") as stream:
        template = yaml.load(stream, Loader=_TemplateLoader)  # noqa: S506 - a SafeLoader subclass
    if not isinstance(template, dict) or not isinstance(template.get("Resources"), dict):
        raise LocalStackError(f"{path} is not a CloudFormation template (no Resources mapping)")
    return template


class _OfflinePolicyLoader:
    """The translator's managed-policy loader, answering from :data:`MANAGED_POLICIES` instead of IAM."""

    def load(self) -> dict[str, str]:
        return dict(MANAGED_POLICIES)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


_LOCAL_URI_PROPERTIES: Final = ("CodeUri", "ContentUri")


def _replace_local_uris(template: dict[str, Any]) -> dict[str, str]:
    """Swap local CodeUri/ContentUri folders for placeholder S3 URIs (the translator wants S3); return the map."""
    code_paths: dict[str, str] = {}
    holders = [resource.get("Properties") for resource in template["Resources"].values() if isinstance(resource, dict)]
    holders += list((template.get("Globals") or {}).values())
    for properties in holders:
        if not isinstance(properties, dict):
            continue
        for key in _LOCAL_URI_PROPERTIES:
            value = properties.get(key)
            if isinstance(value, str) and not value.startswith("s3://"):
                placeholder = LOCAL_URI_PREFIX + value.lstrip("/")
                code_paths[placeholder] = value
                properties[key] = placeholder
    return code_paths


def translate_template(
    path: str | os.PathLike[str] = "template.yaml",
    parameters: Mapping[str, str] | None = None,
    region: str = DEFAULT_REGION,
    account_id: str = DEFAULT_ACCOUNT_ID,
) -> dict[str, Any]:
    """Translate a SAM template to plain CloudFormation, offline (no AWS account, no IAM call).

    Local ``CodeUri``/``ContentUri`` folders become ``s3://local/<folder>`` placeholders; the translated
    template's ``Metadata["LocalCodePaths"]`` maps each placeholder back to the folder as written.

    Parameters
    ----------
    path
        The SAM template.
    parameters
        Template parameter values (those the translator resolves, e.g. in ``AutoPublishAlias``).
    region, account_id
        Pseudo parameters given to the translator.

    Returns
    -------
    dict
        The CloudFormation template (``AWS::Serverless::*`` expanded into functions, roles, rules, mappings).

    Example
    -------
    >>> parameters = {"InstanceCredentialsSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:x"}
    >>> cfn = translate_template("template.yaml", parameters)  # doctest: +SKIP
    >>> cfn["Resources"]["SignupFunction"]["Type"]  # doctest: +SKIP
    'AWS::Lambda::Function'
    """
    template = load_template(path)
    code_paths = _replace_local_uris(template)
    values: dict[str, Any] = {"AWS::Region": region, "AWS::AccountId": account_id, **(parameters or {})}
    # The translator builds a boto3 session only to learn the region; no request is made.
    with _environment(AWS_DEFAULT_REGION=region):
        try:
            translated: dict[str, Any] = transform(template, values, _OfflinePolicyLoader())
        except InvalidDocumentException as exc:
            causes = "; ".join(str(cause.message) for cause in exc.causes) or str(exc)
            raise LocalStackError(f"{path}: SAM translation failed: {causes}") from exc
    translated.setdefault("Metadata", {})[CODE_PATHS_METADATA] = code_paths
    return translated


# ---------------------------------------------------------------------------------------------- resolver


class _NoValue:
    """``AWS::NoValue``: the property (or list item) that holds it is removed."""


_NO_VALUE: Final = _NoValue()
_SUB_VARIABLE: Final = re.compile(r"\$\{([^}]*)\}")


def _partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def _to_str(value: Any, where: str = "value") -> str:
    """CloudFormation's string form of a scalar (a bool is ``true``/``false``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise LocalStackError(f"{where}: expected a string, got {value!r}")


class _Resolver:
    """Evaluates intrinsic functions against parameters, pseudo parameters and the resources created so far."""

    def __init__(self, template: Mapping[str, Any], refs: Mapping[str, Any]) -> None:
        self.refs: dict[str, Any] = dict(refs)
        self.attributes: dict[str, dict[str, str]] = {}
        self._resources: Mapping[str, Any] = template.get("Resources", {})
        self._conditions: Mapping[str, Any] = template.get("Conditions") or {}
        self._mappings: Mapping[str, Any] = template.get("Mappings") or {}
        self._condition_values: dict[str, bool] = {}
        self._functions: dict[str, Callable[[Any], Any]] = {
            "Ref": self._ref,
            "Fn::GetAtt": self._get_att,
            "Fn::Sub": self._sub,
            "Fn::Join": self._join,
            "Fn::If": self._if,
            "Fn::Select": self._select,
            "Fn::Split": self._split,
            "Fn::FindInMap": self._find_in_map,
            "Fn::Base64": lambda arg: base64.b64encode(_to_str(self.resolve(arg)).encode()).decode(),
            "Fn::GetAZs": lambda arg: [f"{self.refs['AWS::Region']}{zone}" for zone in "abc"],
        }

    def resolve(self, value: Any) -> Any:
        """``value`` with every intrinsic evaluated and every ``AWS::NoValue`` removed."""
        if isinstance(value, list):
            return [item for item in (self.resolve(item) for item in value) if item is not _NO_VALUE]
        if isinstance(value, dict):
            if len(value) == 1:
                ((key, argument),) = value.items()
                function = self._functions.get(key)
                if function is not None:
                    return function(argument)
                if key.startswith("Fn::"):
                    raise LocalStackError(f"intrinsic function {key} is not supported locally")
            resolved = {key: self.resolve(item) for key, item in value.items()}
            return {key: item for key, item in resolved.items() if item is not _NO_VALUE}
        return value

    def resolve_str(self, value: Any, where: str) -> str:
        return _to_str(self.resolve(value), where)

    def condition(self, name: str) -> bool:
        """The value of a named condition of the template."""
        if name not in self._condition_values:
            if name not in self._conditions:
                raise LocalStackError(f"condition {name} is not defined in the template")
            self._condition_values[name] = self._evaluate(self._conditions[name])
        return self._condition_values[name]

    def _evaluate(self, expression: Any) -> bool:
        if isinstance(expression, dict) and len(expression) == 1:
            ((key, argument),) = expression.items()
            if key == "Condition":
                return self.condition(argument)
            if key == "Fn::Equals":
                left, right = (self.resolve_str(side, "Fn::Equals") for side in argument)
                return left == right
            if key == "Fn::Not":
                return not self._evaluate(argument[0])
            if key == "Fn::And":
                return all(self._evaluate(item) for item in argument)
            if key == "Fn::Or":
                return any(self._evaluate(item) for item in argument)
        if isinstance(expression, bool):
            return expression
        raise LocalStackError(f"unsupported condition expression {expression!r}")

    def _ref(self, name: Any) -> Any:
        if name == "AWS::NoValue":
            return _NO_VALUE
        if name in self.refs:
            return self.refs[name]
        if name in self._resources:
            raise LocalStackError(f"Ref {name}: the resource has not been created (dependency order or condition)")
        raise LocalStackError(f"Ref {name}: no such parameter or resource")

    def _get_att(self, argument: Any) -> str:
        logical_id, attribute = argument.split(".", 1) if isinstance(argument, str) else argument
        attribute = self.resolve_str(attribute, f"Fn::GetAtt {logical_id}")
        attributes = self.attributes.get(logical_id)
        if attributes is None:
            raise LocalStackError(f"Fn::GetAtt {logical_id}.{attribute}: the resource has not been created")
        if attribute not in attributes:
            raise LocalStackError(
                f"Fn::GetAtt {logical_id}.{attribute}: attribute not available locally "
                f"(known: {', '.join(sorted(attributes)) or 'none'})"
            )
        return attributes[attribute]

    def _sub(self, argument: Any) -> str:
        text, variables = (argument, {}) if isinstance(argument, str) else argument
        values = {name: self.resolve_str(value, f"Fn::Sub ${{{name}}}") for name, value in variables.items()}

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):  # ${!Literal} is the escape for a literal ${Literal}
                return "${" + name[1:] + "}"
            if name in values:
                return values[name]
            if "." in name and not name.startswith("AWS::"):
                return self._get_att(name)
            return _to_str(self._ref(name), f"Fn::Sub ${{{name}}}")

        return _SUB_VARIABLE.sub(replace, text)

    def _join(self, argument: Any) -> str:
        delimiter, items = argument
        resolved = self.resolve(items)
        return str(delimiter).join(_to_str(item, "Fn::Join") for item in resolved)

    def _if(self, argument: Any) -> Any:
        name, when_true, when_false = argument
        return self.resolve(when_true if self.condition(name) else when_false)

    def _select(self, argument: Any) -> Any:
        index, items = argument
        return self.resolve(items)[int(self.resolve(index))]

    def _split(self, argument: Any) -> list[str]:
        delimiter, text = argument
        return self.resolve_str(text, "Fn::Split").split(delimiter)

    def _find_in_map(self, argument: Any) -> Any:
        name, top, second = (self.resolve(item) for item in argument)
        try:
            return self._mappings[name][top][second]
        except KeyError:
            raise LocalStackError(f"Fn::FindInMap {name}/{top}/{second}: no such entry") from None


def _references(value: Any) -> set[str]:
    """Names a value refers to through Ref, Fn::GetAtt and Fn::Sub (parameters and resources alike)."""
    found: set[str] = set()
    if isinstance(value, list):
        for item in value:
            found |= _references(item)
    elif isinstance(value, dict):
        if len(value) == 1:
            ((key, argument),) = value.items()
            if key == "Ref" and isinstance(argument, str):
                found.add(argument)
            elif key == "Fn::GetAtt":
                found.add(argument.split(".", 1)[0] if isinstance(argument, str) else argument[0])
            elif key == "Fn::Sub":
                text = argument if isinstance(argument, str) else argument[0]
                found |= {name.split(".", 1)[0] for name in _SUB_VARIABLE.findall(text) if not name.startswith("!")}
        for item in value.values():
            found |= _references(item)
    return found


def _dependency_order(resources: Mapping[str, Any]) -> list[str]:
    """Logical ids so that each comes after what it references or DependsOn (in waves, template order within one)."""
    remaining: dict[str, set[str]] = {}
    for logical_id, resource in resources.items():
        depends_on = resource.get("DependsOn", [])
        needs = _references(resource.get("Properties", {})) | set(
            [depends_on] if isinstance(depends_on, str) else depends_on
        )
        remaining[logical_id] = (needs & resources.keys()) - {logical_id}
    order: list[str] = []
    done: set[str] = set()
    while remaining:
        ready = [logical_id for logical_id, needs in remaining.items() if needs <= done]
        if not ready:
            raise LocalStackError(f"circular references between resources: {', '.join(sorted(remaining))}")
        for logical_id in ready:
            order.append(logical_id)
            done.add(logical_id)
            del remaining[logical_id]
    return order


# ---------------------------------------------------------------------------------------------- provisioning


def _resolve_parameters(declared: Mapping[str, Any], given: Mapping[str, str]) -> dict[str, str]:
    """Every declared parameter's value (given, else Default), checked against its constraints like CloudFormation."""
    unknown = set(given) - set(declared)
    if unknown:
        raise LocalStackError(f"parameters not declared by the template: {', '.join(sorted(unknown))}")
    values: dict[str, str] = {}
    for name, spec in declared.items():
        if name in given:
            value = str(given[name])
        elif "Default" in spec:
            value = _to_str(spec["Default"], f"parameter {name}")
        else:
            raise LocalStackError(f"parameter {name} has no Default: pass it in parameters")
        problem = _parameter_problem(spec, value)
        if problem:
            raise LocalStackError(f"parameter {name}={value!r}: {problem}")
        values[name] = value
    return values


def _parameter_problem(spec: Mapping[str, Any], value: str) -> str | None:
    allowed = spec.get("AllowedValues")
    if allowed is not None and value not in [_to_str(item) for item in allowed]:
        return f"not one of {allowed}"
    pattern = spec.get("AllowedPattern")
    if pattern is not None and re.fullmatch(pattern, value) is None:
        return f"does not match {pattern}"
    if spec.get("Type") == "Number":
        try:
            number = float(value)
        except ValueError:
            return "not a number"
        if "MinValue" in spec and number < float(spec["MinValue"]):
            return f"below MinValue {spec['MinValue']}"
        if "MaxValue" in spec and number > float(spec["MaxValue"]):
            return f"above MaxValue {spec['MaxValue']}"
    if "MinLength" in spec and len(value) < int(spec["MinLength"]):
        return f"shorter than MinLength {spec['MinLength']}"
    if "MaxLength" in spec and len(value) > int(spec["MaxLength"]):
        return f"longer than MaxLength {spec['MaxLength']}"
    return None


def _parameter_ref(spec: Mapping[str, Any], value: str) -> Any:
    """What ``Ref`` of a parameter gives: a list for list types, the string otherwise."""
    kind = str(spec.get("Type", "String"))
    if kind == "CommaDelimitedList" or kind.startswith("List<"):
        return [item.strip() for item in value.split(",")] if value else []
    return value


def _bounded_name(base: str, limit: int, suffix: str = "") -> str:
    """``base + suffix`` within a service's name limit, shortened with a stable hash when too long."""
    if len(base) + len(suffix) <= limit:
        return base + suffix
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    return base[: limit - len(suffix) - 9] + "-" + digest + suffix


def _bool(value: Any) -> bool:
    """A template boolean, which may be written ``true`` or ``"true"``."""
    return _to_str(value).lower() == "true"


def _ints(value: Mapping[str, Any] | None) -> dict[str, int] | None:
    return None if value is None else {key: int(item) for key, item in value.items()}


def _json_object(value: Any) -> dict[str, Any]:
    """A policy or pattern given either as a mapping or as a JSON string."""
    parsed = json.loads(value) if isinstance(value, str) else value
    if not isinstance(parsed, dict):
        raise LocalStackError(f"expected a JSON object, got {value!r}")
    return parsed


_SQS_ATTRIBUTES: Final = (
    "ContentBasedDeduplication",
    "DeduplicationScope",
    "DelaySeconds",
    "FifoQueue",
    "FifoThroughputLimit",
    "KmsDataKeyReusePeriodSeconds",
    "KmsMasterKeyId",
    "MaximumMessageSize",
    "MessageRetentionPeriod",
    "ReceiveMessageWaitTimeSeconds",
    "RedriveAllowPolicy",
    "RedrivePolicy",
    "SqsManagedSseEnabled",
    "VisibilityTimeout",
)


def check_resource_types(template: Mapping[str, Any]) -> None:
    """Fail if a resource of a translated template is neither provisioned locally nor deliberately skipped.

    Parameters
    ----------
    template
        A CloudFormation template, e.g. from :func:`translate_template`.

    Raises
    ------
    UnsupportedResourceError
        Naming the first such resource and its type.

    Example
    -------
    >>> check_resource_types({"Resources": {"Topic": {"Type": "AWS::SNS::Topic"}}})
    >>> check_resource_types({"Resources": {"Api": {"Type": "AWS::ApiGateway::RestApi"}}})
    Traceback (most recent call last):
    ...
    local.stack.UnsupportedResourceError: Api: resource type AWS::ApiGateway::RestApi is not supported ...
    """
    for logical_id, resource in template["Resources"].items():
        kind = resource.get("Type")
        if kind not in _HANDLERS and kind not in SKIPPED_TYPES:
            raise UnsupportedResourceError(
                f"{logical_id}: resource type {kind} is not supported by local/stack.py. Teach provision() to "
                "create it, or add it to SKIPPED_TYPES with the reason a local run does not need it."
            )


class _Provisioner:
    """Creates one stack's resources in moto, one method per resource type, and builds the :class:`LocalStack`."""

    def __init__(
        self,
        session: boto3.session.Session,
        *,
        endpoint_url: str,
        region: str,
        account_id: str,
        stack_name: str,
        template: dict[str, Any],
        template_dir: Path,
        parameters: dict[str, str],
    ) -> None:
        self._session = session
        self._clients: dict[str, Any] = {}
        self.endpoint_url = endpoint_url
        self.region = region
        self.account_id = account_id
        self.stack_name = stack_name
        self.template = template
        self._template_dir = template_dir
        self._code_paths: dict[str, str] = template.get("Metadata", {}).get(CODE_PATHS_METADATA, {})
        declared = template.get("Parameters") or {}
        pseudo: dict[str, Any] = {
            "AWS::Region": region,
            "AWS::AccountId": account_id,
            "AWS::Partition": _partition(region),
            "AWS::StackName": stack_name,
            "AWS::StackId": f"arn:{_partition(region)}:cloudformation:{region}:{account_id}:stack/{stack_name}/local",
            "AWS::URLSuffix": "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com",
            "AWS::NotificationARNs": [],
        }
        refs = {name: _parameter_ref(declared[name], value) for name, value in parameters.items()}
        self.resolver = _Resolver(template, {**pseudo, **refs})
        self.buses: set[str] = {"default"}
        self.stack = LocalStack(
            endpoint_url=endpoint_url,
            region=region,
            account_id=account_id,
            stack_name=stack_name,
            parameters=parameters,
            outputs={},
            physical={},
            attributes={},
            resource_types={},
            functions={},
            event_source_mappings=[],
            rules=[],
            schedules=[],
            event_invoke_configs={},
            roles={},
            skipped={},
        )

    # ------------------------------------------------------------------ driver

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self._session.client(
                service, endpoint_url=self.endpoint_url, region_name=self.region
            )
        return self._clients[service]

    def run(self) -> LocalStack:
        for parameter in EVENT_BUS_PARAMETERS:
            if parameter in self.stack.parameters:
                self._ensure_bus(self.stack.parameters[parameter])
        resources = self.template["Resources"]
        for logical_id in _dependency_order(resources):
            resource = resources[logical_id]
            condition = resource.get("Condition")
            if condition is not None and not self.resolver.condition(condition):
                continue
            kind = resource["Type"]
            try:
                if kind in SKIPPED_TYPES:
                    self._skip(logical_id, kind, resource.get("Properties", {}))
                else:
                    _HANDLERS[kind](self, logical_id, self.resolver.resolve(resource.get("Properties", {})))
            except LocalStackError as exc:
                raise LocalStackError(f"{logical_id} ({kind}): {exc}") from exc
            self.stack.resource_types[logical_id] = kind
        self._outputs()
        return self.stack

    def _register(self, logical_id: str, ref: str, **attributes: str) -> None:
        self.resolver.refs[logical_id] = ref
        self.resolver.attributes[logical_id] = attributes
        self.stack.physical[logical_id] = ref
        self.stack.attributes[logical_id] = attributes

    def _name(self, logical_id: str, limit: int, suffix: str = "") -> str:
        return _bounded_name(f"{self.stack_name}-{logical_id}", limit, suffix)

    def _arn(self, service: str, resource: str, *, region: bool = True) -> str:
        return f"arn:{_partition(self.region)}:{service}:{self.region if region else ''}:{self.account_id}:{resource}"

    def _ignored(self, logical_id: str, properties: Mapping[str, Any], applied: set[str]) -> None:
        ignored = sorted(set(properties) - applied)
        if ignored:
            self.stack.notes.append(f"{logical_id}: not applied locally: {', '.join(ignored)}")

    def _outputs(self) -> None:
        for name, output in (self.template.get("Outputs") or {}).items():
            condition = output.get("Condition")
            if condition is not None and not self.resolver.condition(condition):
                continue
            try:
                self.stack.outputs[name] = self.resolver.resolve_str(output["Value"], f"output {name}")
            except LocalStackError as exc:
                raise LocalStackError(f"output {name}: {exc}") from exc

    # ------------------------------------------------------------------ skipped (synthetic names and ARNs)

    def _skip(self, logical_id: str, kind: str, raw: Mapping[str, Any]) -> None:
        """Record a resource that is not created, with the Ref and attributes CloudFormation would give it."""
        self.stack.skipped[logical_id] = kind

        def named(key: str, limit: int = 64) -> str:
            return self.resolver.resolve_str(raw[key], key) if key in raw else self._name(logical_id, limit)

        if kind == "AWS::IAM::Role":
            name = named("RoleName")
            arn = self._arn("iam", f"role{raw.get('Path', '/')}{name}", region=False)
            role_id = "AROA" + hashlib.sha256(arn.encode()).hexdigest()[:17].upper()
            self._register(logical_id, name, Arn=arn, RoleId=role_id)
            self.stack.roles[logical_id] = self.resolver.resolve(raw)
        elif kind == "AWS::IAM::ManagedPolicy":
            arn = self._arn("iam", f"policy/{named('ManagedPolicyName')}", region=False)
            self._register(logical_id, arn, PolicyArn=arn)
        elif kind == "AWS::Lambda::LayerVersion":
            arn = self._arn("lambda", f"layer:{named('LayerName', 140)}:1")
            self._register(logical_id, arn, LayerVersionArn=arn)
        elif kind == "AWS::Lambda::Version":
            function_arn = self._function_arn(raw["FunctionName"])
            self._register(logical_id, f"{function_arn}:1", Version="1", FunctionArn=function_arn)
        elif kind == "AWS::Lambda::Alias":
            alias_arn = f"{self._function_arn(raw['FunctionName'])}:{self.resolver.resolve_str(raw['Name'], 'Name')}"
            self._register(logical_id, alias_arn, AliasArn=alias_arn)
        elif kind in {"AWS::CloudWatch::Alarm", "AWS::CloudWatch::CompositeAlarm"}:
            name = named("AlarmName", 255)
            self._register(logical_id, name, Arn=self._arn("cloudwatch", f"alarm:{name}"))
        elif kind == "AWS::CloudWatch::Dashboard":
            self._register(logical_id, named("DashboardName", 255))
        elif kind == "AWS::SNS::Topic":
            name = named("TopicName", 256)
            arn = self._arn("sns", name)
            self._register(logical_id, arn, TopicArn=arn, TopicName=name)
        elif kind == "AWS::Logs::LogGroup":
            name = named("LogGroupName", 512)
            self._register(logical_id, name, Arn=self._arn("logs", f"log-group:{name}:*"))
        else:  # policies, permissions, subscriptions, metric filters: nothing reads more than a Ref
            self._register(logical_id, self._name(logical_id, 255))

    def _function_arn(self, function_name: Any) -> str:
        value = self.resolver.resolve_str(function_name, "FunctionName")
        return value if value.startswith("arn:") else self._arn("lambda", f"function:{value}")

    # ------------------------------------------------------------------ KMS

    def _kms_key(self, logical_id: str, props: dict[str, Any]) -> None:
        kms = self.client("kms")
        request: dict[str, Any] = {}
        for key in ("Description", "KeyUsage", "KeySpec", "MultiRegion"):
            if key in props:
                request[key] = props[key]
        if "KeyPolicy" in props:
            request["Policy"] = json.dumps(_json_object(props["KeyPolicy"]))
        if "Tags" in props:
            request["Tags"] = [{"TagKey": tag["Key"], "TagValue": tag["Value"]} for tag in props["Tags"]]
        metadata = kms.create_key(**request)["KeyMetadata"]
        key_id = metadata["KeyId"]
        if _bool(props.get("EnableKeyRotation", False)):
            kms.enable_key_rotation(KeyId=key_id)
        if not _bool(props.get("Enabled", True)):
            kms.disable_key(KeyId=key_id)
        self._register(logical_id, key_id, Arn=metadata["Arn"], KeyId=key_id)
        self._ignored(logical_id, props, {*request, "KeyPolicy", "Tags", "EnableKeyRotation", "Enabled"})

    def _kms_alias(self, logical_id: str, props: dict[str, Any]) -> None:
        name = _to_str(props["AliasName"], "AliasName")
        self.client("kms").create_alias(AliasName=name, TargetKeyId=props["TargetKeyId"])
        self._register(logical_id, name)

    # ------------------------------------------------------------------ DynamoDB

    def _table(self, logical_id: str, props: dict[str, Any]) -> None:
        dynamodb = self.client("dynamodb")
        name = props.get("TableName") or self._name(logical_id, 255)
        request: dict[str, Any] = {
            "TableName": name,
            "AttributeDefinitions": props["AttributeDefinitions"],
            "KeySchema": props["KeySchema"],
            "BillingMode": props.get("BillingMode", "PROVISIONED"),
        }
        if "ProvisionedThroughput" in props:
            request["ProvisionedThroughput"] = _ints(props["ProvisionedThroughput"])
        for key in ("GlobalSecondaryIndexes", "LocalSecondaryIndexes"):
            if key in props:
                request[key] = [self._index(index) for index in props[key]]
        if "StreamSpecification" in props:
            view = props["StreamSpecification"]["StreamViewType"]
            request["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": view}
        if "SSESpecification" in props:
            # CloudFormation says SSEEnabled where the API says Enabled.
            sse = props["SSESpecification"]
            request["SSESpecification"] = {"Enabled": _bool(sse.get("SSEEnabled", False))} | {
                key: sse[key] for key in ("SSEType", "KMSMasterKeyId") if key in sse
            }
        for key in ("TableClass", "Tags"):
            if key in props:
                request[key] = props[key]
        if "DeletionProtectionEnabled" in props:
            request["DeletionProtectionEnabled"] = _bool(props["DeletionProtectionEnabled"])
        table = dynamodb.create_table(**request)["TableDescription"]

        if _bool(props.get("PointInTimeRecoverySpecification", {}).get("PointInTimeRecoveryEnabled", False)):
            dynamodb.update_continuous_backups(
                TableName=name, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
            )
        ttl = props.get("TimeToLiveSpecification")
        if ttl and _bool(ttl.get("Enabled", False)):
            dynamodb.update_time_to_live(
                TableName=name, TimeToLiveSpecification={"Enabled": True, "AttributeName": ttl["AttributeName"]}
            )
        attributes = {"Arn": table["TableArn"]}
        if "LatestStreamArn" in table:
            attributes["StreamArn"] = table["LatestStreamArn"]
        self._register(logical_id, name, **attributes)
        self._ignored(
            logical_id,
            props,
            {*request, "SSESpecification", "PointInTimeRecoverySpecification", "TimeToLiveSpecification"},
        )

    @staticmethod
    def _index(index: Mapping[str, Any]) -> dict[str, Any]:
        converted = {key: value for key, value in index.items() if key != "ContributorInsightsSpecification"}
        if "ProvisionedThroughput" in converted:
            converted["ProvisionedThroughput"] = _ints(converted["ProvisionedThroughput"])
        return converted

    # ------------------------------------------------------------------ SQS

    def _queue(self, logical_id: str, props: dict[str, Any]) -> None:
        fifo = _bool(props.get("FifoQueue", False))
        name = props.get("QueueName") or self._name(logical_id, 80, ".fifo" if fifo else "")
        attributes = {key: self._sqs_attribute(props[key]) for key in _SQS_ATTRIBUTES if key in props}
        request: dict[str, Any] = {"QueueName": name, "Attributes": attributes}
        if "Tags" in props:
            request["tags"] = {tag["Key"]: tag["Value"] for tag in props["Tags"]}
        url, arn = self._create_queue(request)
        self._register(logical_id, url, Arn=arn, QueueUrl=url, QueueName=name)
        self._ignored(logical_id, props, {*_SQS_ATTRIBUTES, "QueueName", "Tags"})

    def _create_queue(self, request: dict[str, Any]) -> tuple[str, str]:
        sqs = self.client("sqs")
        url: str = sqs.create_queue(**request)["QueueUrl"]
        arn: str = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        return url, arn

    @staticmethod
    def _sqs_attribute(value: Any) -> str:
        # The API takes every attribute as a string; policies as JSON.
        return json.dumps(value) if isinstance(value, dict) else _to_str(value)

    def _queue_policy(self, logical_id: str, props: dict[str, Any]) -> None:
        policy = json.dumps(_json_object(props["PolicyDocument"]))
        for url in props["Queues"]:
            self.client("sqs").set_queue_attributes(QueueUrl=url, Attributes={"Policy": policy})
        self._register(logical_id, self._name(logical_id, 255))

    # ------------------------------------------------------------------ Secrets Manager

    def _secret(self, logical_id: str, props: dict[str, Any]) -> None:
        secretsmanager = self.client("secretsmanager")
        name = _to_str(props["Name"], "Name") if "Name" in props else self._name(logical_id, 512)
        request: dict[str, Any] = {"Name": name}
        for key in ("Description", "KmsKeyId"):
            if key in props:
                request[key] = _to_str(props[key], key)
        if "Tags" in props:
            request["Tags"] = props["Tags"]
        if "SecretString" in props:
            request["SecretString"] = _to_str(props["SecretString"], "SecretString")
        elif "GenerateSecretString" in props:
            # As CloudFormation does: a random password with the given options (moto's GetRandomPassword), alone
            # or put under GenerateStringKey in SecretStringTemplate.
            generate = dict(props["GenerateSecretString"])
            template = generate.pop("SecretStringTemplate", None)
            key = generate.pop("GenerateStringKey", None)
            options: dict[str, Any] = {}
            for option, value in generate.items():
                if option == "PasswordLength":
                    options[option] = int(value)
                elif option == "ExcludeCharacters":
                    options[option] = _to_str(value, option)
                else:  # the Exclude*/Include*/Require* flags
                    options[option] = _bool(value)
            password: str = secretsmanager.get_random_password(**options)["RandomPassword"]
            if template is not None and key is not None:
                request["SecretString"] = json.dumps(_json_object(json.loads(template)) | {key: password})
            else:
                request["SecretString"] = password
        arn: str = secretsmanager.create_secret(**request)["ARN"]
        self._register(logical_id, arn, Id=arn)
        self._ignored(logical_id, props, {*request, "GenerateSecretString"})

    # ------------------------------------------------------------------ EventBridge and Scheduler

    def _ensure_bus(self, name_or_arn: str) -> str:
        name = name_or_arn.split("event-bus/", 1)[-1]
        if name not in self.buses:
            events = self.client("events")
            if name not in {bus["Name"] for bus in events.list_event_buses(NamePrefix=name)["EventBuses"]}:
                events.create_event_bus(Name=name)
                self.stack.notes.append(f"event bus {name} created (named by a parameter or a rule)")
            self.buses.add(name)
        return name

    def _event_bus(self, logical_id: str, props: dict[str, Any]) -> None:
        name = _to_str(props["Name"], "Name")
        arn = self.client("events").create_event_bus(Name=name)["EventBusArn"]
        self.buses.add(name)
        self._register(logical_id, name, Arn=arn, Name=name)
        self._ignored(logical_id, props, {"Name"})

    def _rule(self, logical_id: str, props: dict[str, Any]) -> None:
        events = self.client("events")
        bus = self._ensure_bus(_to_str(props.get("EventBusName", "default")))
        name = props.get("Name") or self._name(logical_id, 64)
        pattern = _json_object(props["EventPattern"]) if "EventPattern" in props else None
        request: dict[str, Any] = {"Name": name, "EventBusName": bus, "State": props.get("State", "ENABLED")}
        for key in ("Description", "ScheduleExpression", "RoleArn"):
            if key in props:
                request[key] = props[key]
        if pattern is not None:
            request["EventPattern"] = json.dumps(pattern)
        arn = events.put_rule(**request)["RuleArn"]

        targets = [
            self._rule_target(logical_id, index, target) for index, target in enumerate(props.get("Targets", []))
        ]
        if targets:
            events.put_targets(Rule=name, EventBusName=bus, Targets=[moto_target for _, moto_target in targets])
        self.stack.rules.append(
            RuleSpec(
                logical_id=logical_id,
                name=name,
                arn=arn,
                bus=bus,
                event_pattern=pattern,
                schedule_expression=props.get("ScheduleExpression"),
                state=request["State"],
                targets=[spec for spec, _ in targets],
            )
        )
        # CloudFormation's Ref of a rule on a custom bus is "bus|rule".
        self._register(logical_id, name if bus == "default" else f"{bus}|{name}", Arn=arn)
        self._ignored(logical_id, props, {*request, "EventBusName", "EventPattern", "Targets"})

    def _rule_target(self, rule_id: str, index: int, target: dict[str, Any]) -> tuple[RuleTargetSpec, dict[str, Any]]:
        """The recorded target and the target given to moto (an SQS tap instead of a function)."""
        function = self._function_of(target["Arn"])
        spec = RuleTargetSpec(
            id=target["Id"],
            arn=target["Arn"],
            function=function,
            retry_policy=_ints(target.get("RetryPolicy")),
            dead_letter_arn=target.get("DeadLetterConfig", {}).get("Arn"),
            input=target.get("Input"),
            input_path=target.get("InputPath"),
            input_transformer=target.get("InputTransformer"),
        )
        moto_target = dict(target)
        if spec.retry_policy is not None:
            moto_target["RetryPolicy"] = spec.retry_policy
        if target["Arn"].split(":")[2] == "lambda":
            # moto raises NotImplementedError when an event matches a rule with a Lambda target, so the rule
            # delivers to a queue instead, which the local router polls to invoke the function in-process.
            tap_name = self._name(rule_id, 80, "-tap" if index == 0 else f"-tap{index}")
            spec.tap_queue_url, spec.tap_queue_arn = self._create_queue({"QueueName": tap_name})
            moto_target["Arn"] = spec.tap_queue_arn
            self.stack.notes.append(f"{rule_id}: target {spec.id} ({function or spec.arn}) delivers to tap {tap_name}")
        return spec, moto_target

    def _schedule_group(self, logical_id: str, props: dict[str, Any]) -> None:
        name = props.get("Name") or self._name(logical_id, 64)
        arn = self.client("scheduler").create_schedule_group(Name=name)["ScheduleGroupArn"]
        self._register(logical_id, name, Arn=arn)
        self._ignored(logical_id, props, {"Name"})

    def _schedule(self, logical_id: str, props: dict[str, Any]) -> None:
        name = props.get("Name") or self._name(logical_id, 64)
        target = dict(props["Target"])
        if "RetryPolicy" in target:
            target["RetryPolicy"] = _ints(target["RetryPolicy"])
        request: dict[str, Any] = {
            "Name": name,
            "ScheduleExpression": props["ScheduleExpression"],
            "FlexibleTimeWindow": props["FlexibleTimeWindow"],
            "Target": target,
            "State": props.get("State", "ENABLED"),
        }
        for key in ("GroupName", "Description", "ScheduleExpressionTimezone", "StartDate", "EndDate", "KmsKeyArn"):
            if key in props:
                request[key] = props[key]
        arn = self.client("scheduler").create_schedule(**request)["ScheduleArn"]
        self.stack.schedules.append(
            ScheduleSpec(
                logical_id=logical_id,
                name=name,
                group=props.get("GroupName", "default"),
                arn=arn,
                expression=props["ScheduleExpression"],
                timezone=props.get("ScheduleExpressionTimezone"),
                state=request["State"],
                target_arn=target["Arn"],
                function=self._function_of(target["Arn"]),
                input=target.get("Input"),
                retry_policy=target.get("RetryPolicy"),
                dead_letter_arn=target.get("DeadLetterConfig", {}).get("Arn"),
                flexible_time_window=props["FlexibleTimeWindow"],
            )
        )
        self._register(logical_id, name, Arn=arn)
        self._ignored(logical_id, props, set(request))

    # ------------------------------------------------------------------ Lambda (recorded, never created)

    def _function_of(self, reference: str) -> str | None:
        """Logical id of the template function a name or (qualified) ARN designates, if any."""
        name = reference.split(":")[6] if reference.startswith("arn:") and ":function:" in reference else reference
        return next((spec.logical_id for spec in self.stack.functions.values() if spec.name == name), None)

    def _function(self, logical_id: str, props: dict[str, Any]) -> None:
        name = props.get("FunctionName") or self._name(logical_id, 64)
        arn = self._arn("lambda", f"function:{name}")
        variables = props.get("Environment", {}).get("Variables", {})
        self.stack.functions[logical_id] = FunctionSpec(
            logical_id=logical_id,
            name=name,
            arn=arn,
            handler=props.get("Handler", ""),
            runtime=props.get("Runtime", ""),
            code_path=self._local_path(props.get("Code", {})),
            timeout=int(props.get("Timeout", 3)),
            memory=int(props.get("MemorySize", 128)),
            environment={key: _to_str(value, f"Environment.Variables.{key}") for key, value in variables.items()},
            layers=[
                self._layer(layer) for layer in self.template["Resources"][logical_id]["Properties"].get("Layers", [])
            ],
            reserved_concurrency=(
                int(props["ReservedConcurrentExecutions"]) if "ReservedConcurrentExecutions" in props else None
            ),
        )
        self._register(logical_id, name, Arn=arn)

    def _local_path(self, location: Mapping[str, Any]) -> str | None:
        if "S3Bucket" not in location:
            return None  # inline (ZipFile) or image code
        original = self._code_paths.get(f"s3://{location['S3Bucket']}/{location['S3Key']}")
        return str((self._template_dir / original).resolve()) if original is not None else None

    def _layer(self, raw: Any) -> str:
        """A function's layer as the local folder of a template layer, else as the resolved ARN."""
        if isinstance(raw, dict) and set(raw) == {"Ref"}:
            layer = self.template["Resources"].get(raw["Ref"], {})
            if layer.get("Type") == "AWS::Lambda::LayerVersion":
                path = self._local_path(layer.get("Properties", {}).get("Content", {}))
                if path is not None:
                    return path
        return self.resolver.resolve_str(raw, "Layers")

    def _event_source_mapping(self, logical_id: str, props: dict[str, Any]) -> None:
        source_arn = _to_str(props["EventSourceArn"], "EventSourceArn")
        function = self._function_of(_to_str(props["FunctionName"], "FunctionName"))
        if function is None:
            raise LocalStackError(f"FunctionName {props['FunctionName']!r} is not a function of the template")
        source = next((lid for lid, attrs in self.stack.attributes.items() if source_arn in attrs.values()), None)
        is_queue = source_arn.split(":")[2] == "sqs"
        self.stack.event_source_mappings.append(
            EventSourceMappingSpec(
                logical_id=logical_id,
                function=function,
                event_source_arn=source_arn,
                source_logical_id=source,
                queue_url=self.stack.attributes[source]["QueueUrl"] if is_queue and source else None,
                batch_size=int(props.get("BatchSize", 10 if is_queue else 100)),
                batching_window=int(props.get("MaximumBatchingWindowInSeconds", 0)),
                function_response_types=list(props.get("FunctionResponseTypes", [])),
                maximum_concurrency=(
                    int(props["ScalingConfig"]["MaximumConcurrency"])
                    if "MaximumConcurrency" in props.get("ScalingConfig", {})
                    else None
                ),
                enabled=_bool(props.get("Enabled", True)),
                filter_patterns=[item["Pattern"] for item in props.get("FilterCriteria", {}).get("Filters", [])],
            )
        )
        self._register(logical_id, self._name(logical_id, 255))

    def _event_invoke_config(self, logical_id: str, props: dict[str, Any]) -> None:
        function = self._function_of(_to_str(props["FunctionName"], "FunctionName"))
        if function is None:
            raise LocalStackError(f"FunctionName {props['FunctionName']!r} is not a function of the template")
        self.stack.event_invoke_configs[function] = {
            key: value for key, value in props.items() if key not in {"FunctionName", "Qualifier"}
        }
        self._register(logical_id, self._name(logical_id, 255))


#: How each provisioned resource type is created (or recorded); with SKIPPED_TYPES, every type a template may use.
_HANDLERS: Final[Mapping[str, Callable[[_Provisioner, str, dict[str, Any]], None]]] = MappingProxyType(
    {
        "AWS::KMS::Key": _Provisioner._kms_key,
        "AWS::KMS::Alias": _Provisioner._kms_alias,
        "AWS::DynamoDB::Table": _Provisioner._table,
        "AWS::SQS::Queue": _Provisioner._queue,
        "AWS::SQS::QueuePolicy": _Provisioner._queue_policy,
        "AWS::SecretsManager::Secret": _Provisioner._secret,
        "AWS::Events::EventBus": _Provisioner._event_bus,
        "AWS::Events::Rule": _Provisioner._rule,
        "AWS::Scheduler::ScheduleGroup": _Provisioner._schedule_group,
        "AWS::Scheduler::Schedule": _Provisioner._schedule,
        "AWS::Lambda::Function": _Provisioner._function,
        "AWS::Lambda::EventSourceMapping": _Provisioner._event_source_mapping,
        "AWS::Lambda::EventInvokeConfig": _Provisioner._event_invoke_config,
    }
)


def provision(
    endpoint_url: str,
    *,
    template_path: str | os.PathLike[str] = "template.yaml",
    parameters: Mapping[str, str] | None = None,
    stack_name: str = DEFAULT_STACK_NAME,
    region: str = DEFAULT_REGION,
    instance_credentials: Mapping[str, Any] | None = None,
    admin_credentials: Mapping[str, Any] | None = None,
) -> LocalStack:
    """Create the template's resources in a moto server and record what the local runtime needs.

    Resources are created, never updated: provision into a fresh moto server, or under another ``stack_name`` or
    ``region`` (names the template fixes itself, such as a SAM ``ScheduleV2`` name, must not exist yet).
    Parameters and resource types are checked before anything is created.

    Parameters
    ----------
    endpoint_url
        The moto server, e.g. ``http://127.0.0.1:5000``.
    template_path
        The SAM template (read and translated here; there is no second description of the resources).
    parameters
        Template parameter values; the others take their ``Default`` (or, for the event sources a deployment must
        choose, :data:`LOCAL_PARAMETER_VALUES`).
    stack_name
        Prefix of physical names (``<stack>-<LogicalId>``) and the value of ``AWS::StackName``.
    region
        Region of the clients and of ``AWS::Region``.
    instance_credentials
        The value of the instance-credentials secret (``{"default": {"InstanceId": …, "InstanceKey": …}}``).
        When given, the secret ``<stack>-instance-credentials`` is created first and its ARN becomes the
        ``InstanceCredentialsSecretArn`` parameter; otherwise that parameter must be given.
    admin_credentials
        The value of the admin-credentials secret (``{"Email": …, "Password": …}``). Unless the
        ``AdminCredentialsSecretArn`` parameter is given, the secret ``<stack>-admin-credentials`` is created with
        it (``{}`` when ``None``: the lifecycle function then cannot log in, and says so) and its ARN passed.

    Returns
    -------
    LocalStack
        Names, URLs and ARNs of what was created, resolved outputs, and the recorded functions, event source
        mappings, rules and schedules.

    Raises
    ------
    UnsupportedResourceError
        A resource type of the template is neither provisioned nor in :data:`SKIPPED_TYPES`.
    LocalStackError
        A parameter is missing or invalid, or a reference cannot be resolved.

    Example
    -------
    >>> stack = provision(  # doctest: +SKIP
    ...     "http://127.0.0.1:5000",
    ...     instance_credentials={"default": {"InstanceId": "id", "InstanceKey": "key"}},
    ... )
    >>> stack.functions["SignupFunction"].environment["TOKENS_TABLE_NAME"]  # doctest: +SKIP
    'telematics-local-TokensTable'
    """
    template_file = Path(template_path)
    session = boto3.session.Session(
        aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=DUMMY_CREDENTIALS["AWS_SESSION_TOKEN"],
        region_name=region,
    )
    declared = load_template(template_file).get("Parameters") or {}
    local_values = {
        name: value
        for name, value in LOCAL_PARAMETER_VALUES.items()
        if name in declared and "Default" not in declared[name]
    }
    given = local_values | dict(parameters or {})
    if instance_credentials is not None and SECRET_PARAMETER in given:
        raise LocalStackError(f"give either instance_credentials or the {SECRET_PARAMETER} parameter, not both")
    account_id: str = session.client("sts", endpoint_url=endpoint_url).get_caller_identity()["Account"]

    # Validate and translate before creating anything, so a bad parameter or an unsupported resource leaves moto
    # untouched. The secret does not exist yet: translate with a stand-in ARN (the translator only inlines
    # parameters in a few properties such as CodeUri or AutoPublishAlias, never in this one).
    secret_name = f"{stack_name}-instance-credentials"
    stand_in = {SECRET_PARAMETER: f"arn:{_partition(region)}:secretsmanager:{region}:{account_id}:secret:{secret_name}"}
    admin_secret_name = f"{stack_name}-admin-credentials"
    if ADMIN_SECRET_PARAMETER in declared and ADMIN_SECRET_PARAMETER not in given:
        prefix = f"arn:{_partition(region)}:secretsmanager:{region}:{account_id}:secret:"
        given[ADMIN_SECRET_PARAMETER] = prefix + admin_secret_name
        admin_secret: Mapping[str, Any] | None = dict(admin_credentials or {})
    else:
        admin_secret = None
    values = _resolve_parameters(declared, given | stand_in if instance_credentials is not None else given)
    translated = translate_template(template_file, values, region=region, account_id=account_id)
    check_resource_types(translated)

    if admin_secret is not None:
        created = session.client("secretsmanager", endpoint_url=endpoint_url).create_secret(
            Name=admin_secret_name, SecretString=json.dumps(admin_secret)
        )
        given[ADMIN_SECRET_PARAMETER] = created["ARN"]
        values = _resolve_parameters(declared, given | stand_in if instance_credentials is not None else given)
    if instance_credentials is not None:
        secret = session.client("secretsmanager", endpoint_url=endpoint_url).create_secret(
            Name=secret_name, SecretString=json.dumps(dict(instance_credentials))
        )
        values = _resolve_parameters(declared, given | {SECRET_PARAMETER: secret["ARN"]})
    return _Provisioner(
        session,
        endpoint_url=endpoint_url,
        region=region,
        account_id=account_id,
        stack_name=stack_name,
        template=translated,
        template_dir=template_file.resolve().parent,
        parameters=values,
    ).run()
