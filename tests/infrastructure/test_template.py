"""template.yaml tested like code: linted, translated offline, and held to the promises the design makes.

Each rule is a function that returns the problems it finds in a translated (CloudFormation) template, so that
the last test can prove every rule fails on a template broken in the way the rule is about. The expectations
are read from the template where possible (which queue feeds which function, which key encrypts which table),
so a new queue or function is checked as soon as it is added.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cfnlint.api import lint
from pydantic import ValidationError

from local.stack import CODE_PATHS_METADATA, load_template, translate_template
from telematics_reg.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
WIRING = ROOT / "layers" / "telematics" / "telematics_reg" / "wiring.py"
PARAMETERS = {"InstanceCredentialsSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:credentials-AbCdEf"}

#: Managed policies the translator attaches, and why each may use ``Resource: "*"``.
ALLOWED_MANAGED_POLICIES = {
    "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole": (
        "logs:CreateLogGroup/CreateLogStream/PutLogEvents for the function's own log group; attached by SAM to "
        "every function"
    ),
    "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess": (
        "Tracing: Active. X-Ray's PutTraceSegments/PutTelemetryRecords have no resource-level permissions"
    ),
    "arn:aws:iam::aws:policy/service-role/AWSLambdaSQSQueueExecutionRole": (
        "attached by SAM for an SQS event source (Lambda's pollers receive/delete with the function's role); "
        "broader than the one mapped queue, but not replaceable without dropping SAM's SQS event"
    ),
}
#: Inline statements allowed ``Resource: "*"``: (role logical id, frozenset of actions) -> justification.
#: Empty: every inline statement of the template names its resources.
ALLOWED_WILDCARD_RESOURCES: dict[tuple[str, frozenset[str]], str] = {}
#: Variables a function may have beyond the settings model: read by the Powertools library itself.
LIBRARY_VARIABLE_PREFIXES = ("POWERTOOLS_",)
#: Settings whose value must be the same in every function that sets it (they describe shared data).
SHARED_SETTINGS = ("REFRESH_SHARDS", "REFRESH_MARGIN_SECONDS", "TOKENS_TABLE_NAME", "CREDENTIALS_SECRET_ARN")
#: Deletion policies that keep a resource when the stack is deleted.
RETAINED = ("Retain", "RetainExceptOnCreate")
#: Which function may Query which index of the tokens table (everything else reads items by key).
QUERIES = {
    "RefreshSweeperFunction": {"RefreshDue"},
    # A ClientId's stored DeviceToken before one is derived (registration), its items and tombstones (lifecycle),
    # the user of an upstream ClientId (the drift audit).
    "SignupFunction": {"ByClient"},
    "RegistrationQueueFunction": {"ByClient"},
    "LifecycleFunction": {"ByClient"},
    "ReconcileFunction": {"ByClient"},
}
#: Item attributes the sweeper may touch: it marks a user's job queued, conditioned on the version it saw.
SWEEPER_ATTRIBUTES = {"pk", "QueuedUntil", "Version"}

Template = dict[str, Any]


# --------------------------------------------------------------------------------------------- fixtures


def translate(path: Path) -> Template:
    return translate_template(path, PARAMETERS)


@pytest.fixture(scope="module")
def sam() -> Template:
    return load_template(TEMPLATE)


@pytest.fixture(scope="module")
def cfn() -> Template:
    return translate(TEMPLATE)


# --------------------------------------------------------------------------------------------- helpers


def resources(template: Template, kind: str) -> dict[str, dict[str, Any]]:
    return {lid: res.get("Properties", {}) for lid, res in template["Resources"].items() if res.get("Type") == kind}


def target(value: Any) -> str | None:
    """The logical id a ``Ref`` / ``Fn::GetAtt`` (or ``Fn::Sub`` of one) points at, if any."""
    if isinstance(value, dict) and len(value) == 1:
        ((key, argument),) = value.items()
        if key == "Ref" and isinstance(argument, str):
            return argument
        if key == "Fn::GetAtt":
            return str(argument.split(".", 1)[0] if isinstance(argument, str) else argument[0])
        if key == "Fn::Sub" and isinstance(argument, str) and argument.startswith("${") and "}" in argument:
            return argument[2:].split("}", 1)[0].split(".", 1)[0]
    return None


def possible_values(template: Template, value: Any) -> list[int]:
    """A number of the template, or the bounds and default of the Number parameter it refers to."""
    name = value.get("Ref") if isinstance(value, dict) else None
    if name is None:
        return [int(value)]
    spec = template["Parameters"][name]
    return [int(spec[key]) for key in ("MinValue", "Default", "MaxValue") if key in spec] or [0]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def sqs_mappings(template: Template) -> dict[str, dict[str, Any]]:
    """Event source mappings whose source is a queue of the template."""
    queues = resources(template, "AWS::SQS::Queue")
    return {
        lid: props
        for lid, props in resources(template, "AWS::Lambda::EventSourceMapping").items()
        if target(props.get("EventSourceArn")) in queues
    }


def function_of(template: Template, reference: Any) -> str | None:
    lid = target(reference)
    return lid if lid in resources(template, "AWS::Lambda::Function") else None


def statements(document: Any) -> list[dict[str, Any]]:
    return [s for s in as_list((document or {}).get("Statement", [])) if isinstance(s, dict)]


def inline_policies(template: Template) -> Iterator[tuple[str, dict[str, Any]]]:
    """(owner logical id, statement) of every identity policy the template itself defines."""
    for lid, props in resources(template, "AWS::IAM::Role").items():
        for policy in props.get("Policies", []):
            for statement in statements(policy.get("PolicyDocument")):
                yield lid, statement
    for kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
        for lid, props in resources(template, kind).items():
            for statement in statements(props.get("PolicyDocument")):
                yield lid, statement


def allows(statement: dict[str, Any], action: str) -> bool:
    actions = [str(a).lower() for a in as_list(statement.get("Action", []))]
    service = action.split(":", 1)[0].lower()
    return statement.get("Effect") == "Allow" and (action.lower() in actions or f"{service}:*" in actions)


def role_allows(template: Template, role: str, action: str, resource: str) -> bool:
    """Whether a role of the template has an inline Allow of ``action`` on the resource logical id."""
    for owner, statement in inline_policies(template):
        resources_named = [target(r) for r in as_list(statement.get("Resource", []))]
        if owner == role and allows(statement, action) and resource in resources_named:
            return True
    return False


def role_of(template: Template, function: str) -> str | None:
    return target(resources(template, "AWS::Lambda::Function")[function].get("Role"))


def environment(template: Template, function: str) -> dict[str, Any]:
    props = resources(template, "AWS::Lambda::Function")[function]
    return dict(props.get("Environment", {}).get("Variables", {}))


def kms_key_of_queue(template: Template, queue: str) -> str | None:
    key = target(resources(template, "AWS::SQS::Queue")[queue].get("KmsMasterKeyId"))
    return key if key in resources(template, "AWS::KMS::Key") else None


# --------------------------------------------------------------------------------------------- rules


def sqs_source_problems(template: Template) -> list[str]:
    """Every SQS event source: partial batch responses, bounded concurrency, a DLQ, a long enough visibility."""
    problems: list[str] = []
    queues = resources(template, "AWS::SQS::Queue")
    functions = resources(template, "AWS::Lambda::Function")
    for lid, props in sqs_mappings(template).items():
        queue = target(props["EventSourceArn"])
        assert queue is not None
        function = function_of(template, props.get("FunctionName"))
        if "ReportBatchItemFailures" not in props.get("FunctionResponseTypes", []):
            problems.append(f"{lid}: no ReportBatchItemFailures (one bad record would retry its whole batch)")
        concurrency = props.get("ScalingConfig", {}).get("MaximumConcurrency")
        if concurrency is None:
            problems.append(f"{lid}: no ScalingConfig.MaximumConcurrency (a bulk load could flood the upstream)")
        elif min(possible_values(template, concurrency)) < 2:
            problems.append(f"{lid}: MaximumConcurrency may be below 2, which Lambda rejects")
        redrive = queues[queue].get("RedrivePolicy")
        dlq = target((redrive or {}).get("deadLetterTargetArn"))
        if dlq not in queues:
            problems.append(f"{queue} feeds {function} but has no RedrivePolicy to a dead-letter queue")
        else:
            receives = int(redrive["maxReceiveCount"])
            if not 2 <= receives <= 10:
                problems.append(f"{queue}: maxReceiveCount {receives} (retry at least once, at most ten times)")
            # SQS keeps a message's original enqueue time in the DLQ: a shorter retention there loses it sooner.
            retention = int(queues[queue].get("MessageRetentionPeriod", 345600))
            if int(queues[dlq].get("MessageRetentionPeriod", 345600)) < retention:
                problems.append(f"{dlq} keeps messages for less time than its source queue {queue}")
        if function is None:
            problems.append(f"{lid}: FunctionName is not a function of the template")
            continue
        timeout = int(functions[function].get("Timeout", 3))
        visibility = int(queues[queue].get("VisibilityTimeout", 30))
        if visibility < 6 * timeout:
            problems.append(
                f"{queue}: VisibilityTimeout {visibility} s < 6 x {function}'s Timeout {timeout} s (AWS's guidance)"
            )
    if not sqs_mappings(template):
        problems.append("no SQS event source mapping found: the rule checks nothing")
    return problems


def service_writer_problems(template: Template) -> list[str]:
    """Every queue an AWS service writes to (rule DLQ, schedule DLQ, Lambda destination) lets it write."""
    problems: list[str] = []
    queues = resources(template, "AWS::SQS::Queue")
    policies = resources(template, "AWS::SQS::QueuePolicy")
    keys = resources(template, "AWS::KMS::Key")

    def key_allows_service(key: str, service: str) -> bool:
        for statement in statements(keys[key].get("KeyPolicy")):
            principals = as_list(statement.get("Principal", {}).get("Service", []))
            if service in principals and allows(statement, "kms:GenerateDataKey") and allows(statement, "kms:Decrypt"):
                return True
        return False

    for rule, props in resources(template, "AWS::Events::Rule").items():
        for rule_target in props.get("Targets", []):
            dlq = target(rule_target.get("DeadLetterConfig", {}).get("Arn"))
            if dlq is None:
                continue
            granted = any(
                dlq in [target(q) for q in policy.get("Queues", [])]
                and any(
                    allows(s, "sqs:SendMessage")
                    and "events.amazonaws.com" in as_list(s.get("Principal", {}).get("Service", []))
                    and any(target(r) == dlq for r in as_list(s.get("Resource", [])))
                    and target(s.get("Condition", {}).get("ArnEquals", {}).get("aws:SourceArn")) == rule
                    for s in statements(policy.get("PolicyDocument"))
                )
                for policy in policies.values()
            )
            if not granted:
                problems.append(
                    f"{dlq} is the dead-letter queue of rule {rule} but no queue policy lets events.amazonaws.com "
                    f"send to it for that rule (aws:SourceArn)"
                )
            key = kms_key_of_queue(template, dlq)
            if key is not None and not key_allows_service(key, "events.amazonaws.com"):
                problems.append(f"{dlq} is encrypted with {key}, whose policy does not let EventBridge use it")
    for schedule, props in resources(template, "AWS::Scheduler::Schedule").items():
        dlq = target(props.get("Target", {}).get("DeadLetterConfig", {}).get("Arn"))
        role = target(props.get("Target", {}).get("RoleArn"))
        if dlq is None or role is None:
            continue
        if not role_allows(template, role, "sqs:SendMessage", dlq):
            problems.append(f"{schedule}: its role {role} may not send to its dead-letter queue {dlq}")
        key = kms_key_of_queue(template, dlq)
        if key is not None and not role_allows(template, role, "kms:GenerateDataKey", key):
            problems.append(f"{schedule}: {dlq} is encrypted with {key}, which its role {role} may not use")
    for config_id, props in resources(template, "AWS::Lambda::EventInvokeConfig").items():
        function = function_of(template, props.get("FunctionName"))
        role = role_of(template, function) if function else None
        for kind in ("OnSuccess", "OnFailure"):
            destination = target(props.get("DestinationConfig", {}).get(kind, {}).get("Destination"))
            if destination not in queues or role is None:
                continue
            if not role_allows(template, role, "sqs:SendMessage", destination):
                problems.append(f"{config_id}: {function}'s role may not send to its {kind} destination {destination}")
            key = kms_key_of_queue(template, destination)
            if key is not None and not role_allows(template, role, "kms:GenerateDataKey", key):
                problems.append(f"{config_id}: {destination} is encrypted with {key}, which {function} may not use")
    return problems


def signup_invoke_config_problems(template: Template) -> list[str]:
    """The signup function: async retries bounded, failures to an SQS destination (the same DLQ as its own)."""
    problems: list[str] = []
    queues = resources(template, "AWS::SQS::Queue")
    signup_functions = {
        function_of(template, rule_target.get("Arn"))
        for props in resources(template, "AWS::Events::Rule").values()
        if "UserSignedUp" in json.dumps(props.get("EventPattern", {}))
        for rule_target in props.get("Targets", [])
    } - {None}
    if not signup_functions:
        return ["no rule delivers UserSignedUp events to a function"]
    configs = {
        function_of(template, props.get("FunctionName")): props
        for props in resources(template, "AWS::Lambda::EventInvokeConfig").values()
    }
    for function in sorted(f for f in signup_functions if f):
        config = configs.get(function)
        if config is None:
            problems.append(f"{function} has no EventInvokeConfig: failed signups would be retried then dropped")
            continue
        if "MaximumRetryAttempts" not in config:
            problems.append(f"{function}: EventInvokeConfig has no MaximumRetryAttempts")
        destination = target(config.get("DestinationConfig", {}).get("OnFailure", {}).get("Destination"))
        if destination not in queues:
            problems.append(f"{function}: EventInvokeConfig has no OnFailure destination that is an SQS queue")
        elif target(environment(template, function).get("DEAD_LETTER_QUEUE_URL")) != destination:
            problems.append(f"{function}: its DEAD_LETTER_QUEUE_URL is not its OnFailure destination {destination}")
    return problems


def table_problems(template: Template) -> list[str]:
    """Every table: encrypted with a customer-managed key of the template (rotated), PITR on; kept keys kept."""
    problems: list[str] = []
    keys = resources(template, "AWS::KMS::Key")
    for lid, props in resources(template, "AWS::DynamoDB::Table").items():
        sse = props.get("SSESpecification", {})
        key = target(sse.get("KMSMasterKeyId"))
        if not (sse.get("SSEEnabled") in (True, "true") and sse.get("SSEType") == "KMS" and key in keys):
            problems.append(f"{lid}: not encrypted with a customer-managed KMS key of the template")
        elif keys[key].get("EnableKeyRotation") not in (True, "true"):
            problems.append(f"{lid}: its key {key} does not rotate")
        pitr = props.get("PointInTimeRecoverySpecification", {})
        if pitr.get("PointInTimeRecoveryEnabled") not in (True, "true"):
            problems.append(f"{lid}: point-in-time recovery is off")
        resource = template["Resources"][lid]
        retained = resource.get("DeletionPolicy") in RETAINED
        if retained and key in keys and template["Resources"][key].get("DeletionPolicy") not in RETAINED:
            problems.append(f"{lid} is retained but its key {key} is not: the kept table would become unreadable")
    return problems


def iam_problems(template: Template) -> list[str]:
    """No wildcard actions; no ``Resource: "*"`` unless justified; managed policies from the allowlist only."""
    problems: list[str] = []
    for owner, statement in inline_policies(template):
        if statement.get("Effect") != "Allow":
            continue
        actions = [str(a) for a in as_list(statement.get("Action", []))]
        for action in actions:
            if action == "*" or action.endswith(":*"):
                problems.append(f"{owner}: statement {statement.get('Sid', '')!r} allows {action}")
        if (
            "*" in as_list(statement.get("Resource", []))
            and (owner, frozenset(actions)) not in ALLOWED_WILDCARD_RESOURCES
        ):
            problems.append(f"{owner}: statement {statement.get('Sid', '')!r} allows {actions} on Resource '*'")
        if "NotAction" in statement or "NotResource" in statement:
            problems.append(f"{owner}: statement {statement.get('Sid', '')!r} uses NotAction/NotResource")
    for lid, props in resources(template, "AWS::IAM::Role").items():
        for arn in props.get("ManagedPolicyArns", []):
            if not isinstance(arn, str) or arn not in ALLOWED_MANAGED_POLICIES:
                problems.append(f"{lid}: managed policy {arn} is not in the justified allowlist")
    for key, props in resources(template, "AWS::KMS::Key").items():
        for statement in statements(props.get("KeyPolicy")):
            # kms:* is the key's administrator statement; only the account itself may hold it.
            if allows(statement, "kms:Decrypt") and "kms:*" in as_list(statement.get("Action", [])):
                principal = statement.get("Principal", {})
                if set(principal) != {"AWS"} or not str(json.dumps(principal["AWS"])).endswith(':root"}'):
                    problems.append(f"{key}: kms:* granted to {principal} (only the account root may administer)")
    return problems


def _settings_read_by(tree: ast.AST, name: str) -> set[str]:
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == name
    }


def settings_used(handler_file: Path) -> set[str]:
    """ServiceSettings fields a handler's code reads: its own ``_settings.x`` and, transitively, what the
    ``telematics_reg.wiring`` builders it calls read from ``settings``."""
    wiring = ast.parse(WIRING.read_text(encoding="utf-8"))
    builders = {node.name: node for node in wiring.body if isinstance(node, ast.FunctionDef)}
    handler = ast.parse(handler_file.read_text(encoding="utf-8"))
    imported = {
        alias.name
        for node in ast.walk(handler)
        if isinstance(node, ast.ImportFrom) and node.module == "telematics_reg.wiring"
        for alias in node.names
    }
    used = _settings_read_by(handler, "_settings")
    seen: set[str] = set()
    pending = [name for name in imported if name in builders]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        node = builders[name]
        used |= _settings_read_by(node, "settings")
        pending += [
            call.func.id
            for call in ast.walk(node)
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in builders
        ]
    return used


def handler_file(template: Template, function: str) -> Path:
    props = resources(template, "AWS::Lambda::Function")[function]
    code = props["Code"]
    folder = template["Metadata"][CODE_PATHS_METADATA][f"s3://{code['S3Bucket']}/{code['S3Key']}"]
    module = str(props["Handler"]).rsplit(".", 1)[0]
    return ROOT / folder / f"{module.replace('.', '/')}.py"


def environment_problems(template: Template) -> list[str]:
    """Each function's environment gives every setting its code needs, names resources by reference, has no
    variable nothing reads, and agrees with the others on shared settings."""
    problems: list[str] = []
    fields = ServiceSettings.model_fields
    shared: dict[str, dict[str, Any]] = {}
    for function in resources(template, "AWS::Lambda::Function"):
        variables = environment(template, function)
        used = settings_used(handler_file(template, function))
        derived = {name for name in dir(ServiceSettings) if isinstance(getattr(ServiceSettings, name), property)}
        unknown_fields = used - set(fields) - derived
        if unknown_fields:
            problems.append(f"{function}: code reads settings the model does not have: {sorted(unknown_fields)}")
        for name in sorted(used & set(fields)):
            annotation = str(fields[name].annotation)
            # Strings and URLs name something (a table, a queue, the upstream): they must come from the template.
            # Numbers are tuning, with safe defaults in the model.
            if ("str" in annotation or "Url" in annotation) and name.upper() not in variables:
                problems.append(f"{function}: its code reads {name} but the template does not set {name.upper()}")
        for variable, value in variables.items():
            if variable.startswith(LIBRARY_VARIABLE_PREFIXES):
                continue
            if variable.lower() not in fields:
                problems.append(f"{function}: {variable} is not a setting of ServiceSettings (a typo is ignored)")
            if variable.endswith(("_URL", "_ARN", "_NAME")) and not isinstance(value, dict):
                problems.append(f"{function}: {variable} is the literal {value!r}, not a Ref/GetAtt/parameter")
            if variable in SHARED_SETTINGS:
                shared.setdefault(variable, {})[function] = value
    for variable, values in shared.items():
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            problems.append(f"{variable} differs between functions: {values}")
    problems += _queue_url_problems(template)
    return problems


def _queue_url_problems(template: Template) -> list[str]:
    """Queue URLs point where the design says: a queue function's dead letters go to its source queue's DLQ,
    and the sweeper queues jobs where the refresh worker reads them."""
    problems: list[str] = []
    queues = resources(template, "AWS::SQS::Queue")
    consumers = {
        function_of(template, p.get("FunctionName")): target(p["EventSourceArn"])
        for p in sqs_mappings(template).values()
    }
    for function, queue in consumers.items():
        if function is None or queue is None:
            continue
        dead_letters = target(environment(template, function).get("DEAD_LETTER_QUEUE_URL"))
        redrive = target((queues[queue].get("RedrivePolicy") or {}).get("deadLetterTargetArn"))
        if dead_letters is not None and dead_letters != redrive:
            problems.append(f"{function} dead-letters to {dead_letters}, but {queue} redrives to {redrive}")
    for function in resources(template, "AWS::Lambda::Function"):
        jobs = target(environment(template, function).get("REFRESH_QUEUE_URL"))
        if jobs is not None and jobs not in consumers.values():
            problems.append(f"{function} queues refresh jobs on {jobs}, which no function consumes")
        # A bulk that stopped part-way goes back onto the queue the function reads, which it may write to.
        own = target(environment(template, function).get("REGISTRATION_QUEUE_URL"))
        if own is None:
            continue
        role = role_of(template, function)
        if own != consumers.get(function):
            problems.append(f"{function} sends bulks back to {own}, which is not the queue it reads")
        elif role is None or not role_allows(template, role, "sqs:SendMessage", own):
            problems.append(f"{function} may not send to {own}, its REGISTRATION_QUEUE_URL")
        elif (key := kms_key_of_queue(template, own)) and not role_allows(template, role, "kms:GenerateDataKey", key):
            problems.append(f"{function}: {own} is encrypted with {key}, which its role may not use")
    return problems


def retry_and_dead_letter_problems(template: Template) -> list[str]:
    """Every schedule and every rule target has a retry policy and a dead-letter queue."""
    problems: list[str] = []
    queues = resources(template, "AWS::SQS::Queue")
    targets = [(lid, props.get("Target", {})) for lid, props in resources(template, "AWS::Scheduler::Schedule").items()]
    targets += [
        (lid, rule_target)
        for lid, props in resources(template, "AWS::Events::Rule").items()
        for rule_target in props.get("Targets", [])
    ]
    for lid, spec in targets:
        policy = spec.get("RetryPolicy", {})
        if "MaximumRetryAttempts" not in policy or "MaximumEventAgeInSeconds" not in policy:
            problems.append(f"{lid}: no RetryPolicy with MaximumRetryAttempts and MaximumEventAgeInSeconds")
        if target(spec.get("DeadLetterConfig", {}).get("Arn")) not in queues:
            problems.append(f"{lid}: no DeadLetterConfig to a queue of the template")
    if not resources(template, "AWS::Scheduler::Schedule"):
        problems.append("no schedule: the refresh sweep would never run")
    return problems


# --------------------------------------------------------------------------------------------- deployable on AWS


def _parameter(template: Template, value: Any) -> tuple[str, dict[str, Any]] | None:
    name = value.get("Ref") if isinstance(value, dict) else None
    spec = template.get("Parameters", {}).get(name) if isinstance(name, str) else None
    return (name, spec) if isinstance(name, str) and isinstance(spec, dict) else None


def _condition_can_be_false(template: Template, condition: str) -> bool:
    """Whether a condition of the form ``!Equals [!Ref P, "x"]`` can be false for some allowed value of P."""
    expression = template.get("Conditions", {}).get(condition, {})
    equals = expression.get("Fn::Equals") if isinstance(expression, dict) else None
    if not isinstance(equals, list) or len(equals) != 2:
        return False
    found = _parameter(template, equals[0])
    if found is None:
        return False
    allowed = [str(v) for v in found[1].get("AllowedValues", [])]
    return any(value != str(equals[1]) for value in allowed)


def concurrency_problems(template: Template) -> list[str]:
    """Reserved concurrency can be turned off by a parameter (accounts with a small quota cannot reserve any)."""
    problems: list[str] = []
    reserving = 0
    for lid, props in resources(template, "AWS::Lambda::Function").items():
        reserved = props.get("ReservedConcurrentExecutions")
        if reserved is None:
            continue
        reserving += 1
        branch = reserved.get("Fn::If") if isinstance(reserved, dict) else None
        if not (
            isinstance(branch, list)
            and len(branch) == 3
            and branch[2] == {"Ref": "AWS::NoValue"}
            and _condition_can_be_false(template, str(branch[0]))
        ):
            problems.append(f"{lid}: ReservedConcurrentExecutions cannot be turned off by a parameter")
    if not reserving:
        problems.append("no function reserves concurrency: the rule checks nothing")
    return problems


def _sub_text(value: Any) -> str | None:
    sub = value.get("Fn::Sub") if isinstance(value, dict) else None
    if isinstance(sub, list):
        sub = sub[0]
    return sub if isinstance(sub, str) else None


def log_group_problems(template: Template) -> list[str]:
    """Each function logs to its own log group of the stack, which exists before the function and is named
    from the stack (not from the function: Lambda would create that name itself first, and again after a delete)."""
    problems: list[str] = []
    groups = resources(template, "AWS::Logs::LogGroup")
    used: dict[str, str] = {}
    for lid, props in resources(template, "AWS::Lambda::Function").items():
        group = target(props.get("LoggingConfig", {}).get("LogGroup"))
        if group not in groups:
            problems.append(f"{lid}: no LoggingConfig.LogGroup naming a log group of the stack")
            continue
        if group in used:
            problems.append(f"{lid} and {used[group]} share the log group {group}")
        used[group] = lid
        spec = groups[group]
        name = _sub_text(spec.get("LogGroupName")) or ""
        if "${AWS::StackName}" not in name or _references(spec) & set(resources(template, "AWS::Lambda::Function")):
            problems.append(f"{group}: named from its function, not from the stack ({name!r})")
        if "RetentionInDays" not in spec or target(spec.get("KmsKeyId")) not in resources(template, "AWS::KMS::Key"):
            problems.append(f"{group}: no retention or no key of the template")
    return problems


def _references(value: Any) -> set[str]:
    """Logical ids and parameters a value refers to (``Ref``, ``Fn::GetAtt``, ``${...}`` of ``Fn::Sub``)."""
    in_subs = {part.split("}", 1)[0].split(".", 1)[0] for part in json.dumps(value).split("${")[1:]}
    return in_subs | set(_walk_refs(value))


def _walk_refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "Ref" and isinstance(item, str):
                yield item
            elif key == "Fn::GetAtt":
                yield str(item[0] if isinstance(item, list) else str(item).split(".", 1)[0])
            else:
                yield from _walk_refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk_refs(item)


def _dead_letter_queues(template: Template) -> set[str]:
    queues = resources(template, "AWS::SQS::Queue")
    found = {target((props.get("RedrivePolicy") or {}).get("deadLetterTargetArn")) for props in queues.values()}
    for props in resources(template, "AWS::Events::Rule").values():
        found |= {target(t.get("DeadLetterConfig", {}).get("Arn")) for t in props.get("Targets", [])}
    for props in resources(template, "AWS::Scheduler::Schedule").values():
        found.add(target(props.get("Target", {}).get("DeadLetterConfig", {}).get("Arn")))
    for props in resources(template, "AWS::Lambda::EventInvokeConfig").values():
        found.add(target(props.get("DestinationConfig", {}).get("OnFailure", {}).get("Destination")))
    for props in resources(template, "AWS::Lambda::Function").values():
        found.add(target(props.get("DeadLetterConfig", {}).get("TargetArn")))
    return {queue for queue in found if queue in queues}


def retention_problems(template: Template) -> list[str]:
    """Stored data outlives `sam delete` (table, dead-letter queues, their key) but a failed first create leaves
    nothing behind (RetainExceptOnCreate)."""
    problems: list[str] = []
    keep = [*resources(template, "AWS::DynamoDB::Table"), *resources(template, "AWS::KMS::Key")]
    dead_letters = _dead_letter_queues(template)
    if len(dead_letters) < 4:
        problems.append(f"only {sorted(dead_letters)} found as dead-letter queues: the rule checks too little")
    for lid in [*keep, *sorted(dead_letters)]:
        resource = template["Resources"][lid]
        policy = resource.get("DeletionPolicy")
        if policy not in RETAINED:
            problems.append(f"{lid}: DeletionPolicy {policy} (`sam delete` would throw its data away)")
        elif policy != "RetainExceptOnCreate":
            problems.append(f"{lid}: DeletionPolicy {policy}: a failed first create would leave a billed orphan")
        if lid in dead_letters:
            key = kms_key_of_queue(template, lid)
            if key is not None and template["Resources"][key].get("DeletionPolicy") not in RETAINED:
                problems.append(f"{lid} is kept but its key {key} is not: its dead letters would become unreadable")
    return problems


def pairing_problems(template: Template) -> list[str]:
    """A stack is paired with its app explicitly: the source of the signup events it takes and of the outcome
    events it publishes are parameters without a default (two stacks on one bus must not share either)."""
    problems: list[str] = []
    signup_sources = [
        source
        for props in resources(template, "AWS::Events::Rule").values()
        if "UserSignedUp" in json.dumps(props.get("EventPattern", {}))
        for source in as_list(props.get("EventPattern", {}).get("source", []))
    ]
    for function in resources(template, "AWS::Lambda::Function"):
        found = _parameter(template, environment(template, function).get("OUTCOME_EVENT_SOURCE"))
        if found is None or "Default" in found[1]:
            problems.append(f"{function}: OUTCOME_EVENT_SOURCE is not a parameter without a default")
    if not signup_sources:
        problems.append("no rule takes UserSignedUp events")
    for source in signup_sources:
        found = _parameter(template, source)
        if found is None or "Default" in found[1]:
            problems.append(f"the UserSignedUp rule's source {source} is not a parameter without a default")
    return problems


def shard_problems(template: Template) -> list[str]:
    """The refresh index's shard count cannot change under a live table: it is part of the index's definition."""
    problems: list[str] = []
    shards = {
        str(p.get("Environment", {}).get("Variables", {}).get("REFRESH_SHARDS", {}).get("Ref"))
        for p in resources(template, "AWS::Lambda::Function").values()
        if "REFRESH_SHARDS" in p.get("Environment", {}).get("Variables", {})
    }
    if len(shards) != 1:
        return [f"REFRESH_SHARDS is not one parameter of every function: {shards}"]
    (parameter,) = shards
    for lid, props in resources(template, "AWS::DynamoDB::Table").items():
        for index in props.get("GlobalSecondaryIndexes", []):
            if index["IndexName"] != "RefreshDue":
                continue
            names = index.get("Projection", {}).get("NonKeyAttributes", [])
            if not any(f"${{{parameter}}}" in (_sub_text(name) or "") for name in names):
                problems.append(f"{lid}: the RefreshDue index does not carry {parameter}: lowering it strands users")
    return problems


def _secret_readers(template: Template) -> list[str]:
    return [
        owner
        for owner, statement in inline_policies(template)
        if allows(statement, "secretsmanager:GetSecretValue")
        and any(_parameter(template, r) for r in as_list(statement.get("Resource", [])))
    ]


def least_privilege_problems(template: Template) -> list[str]:
    """No role holds what its function never uses, and parameters cannot widen a grant."""
    problems: list[str] = []
    functions = {role_of(template, f): f for f in resources(template, "AWS::Lambda::Function")}
    for owner, statement in inline_policies(template):
        function = functions.get(owner)
        if function is None or statement.get("Effect") != "Allow":
            continue
        if allows(statement, "kms:Encrypt"):
            problems.append(f"{function}: kms:Encrypt, which no function uses (queues and the table need none)")
        if allows(statement, "dynamodb:Query"):
            indexes = {
                str(_sub_text(r)).rsplit("/", 1)[-1] if _sub_text(r) else "the table itself"
                for r in as_list(statement.get("Resource", []))
            }
            extra = indexes - QUERIES.get(function, set())
            if extra:
                problems.append(f"{function}: may Query {sorted(extra)}, which its code never queries")
        if function == "RefreshSweeperFunction" and allows(statement, "dynamodb:UpdateItem"):
            condition = statement.get("Condition", {})
            attributes = set(as_list(condition.get("ForAllValues:StringEquals", {}).get("dynamodb:Attributes", [])))
            returns = as_list(condition.get("StringEqualsIfExists", {}).get("dynamodb:ReturnValues", []))
            if not attributes or not attributes <= SWEEPER_ATTRIBUTES or returns != ["NONE"]:
                problems.append(
                    f"{function}: UpdateItem not conditioned to {sorted(SWEEPER_ATTRIBUTES)} and no read-back"
                )
    readers = _secret_readers(template)
    if not readers:
        problems.append("no role reads the credentials secret: the rule checks nothing")
    for owner in readers:
        policies = resources(template, "AWS::IAM::Role")[owner].get("Policies", [])
        text = json.dumps([p.get("PolicyDocument") for p in policies])
        if '"Fn::If": ["HasCredentialsSecretKey"' not in text or "kms:ViaService" not in text:
            problems.append(f"{functions.get(owner, owner)}: cannot decrypt a secret under a customer key")
    return problems


def parameter_pattern_problems(template: Template) -> list[str]:
    """Parameters that name a secret or the upstream cannot widen a grant or send secrets in clear text."""
    problems: list[str] = []
    one_secret = ["arn:aws:secretsmanager:eu-west-1:123456789012:secret:telematics/credentials-AbCdEf"]
    wildcards = [
        "arn:aws:secretsmanager:eu-west-1:123456789012:secret:*",
        "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod-*",
        "arn:aws:secretsmanager:*:123456789012:secret:x",
        "arn:aws:secretsmanager:eu-west-1:123456789012:secret:cred?ntials",
    ]
    cases = {
        "InstanceCredentialsSecretArn": (one_secret, wildcards),
        "AdminCredentialsSecretArn": (one_secret, [*wildcards, ""]),
        # Empty: the stack creates the key's secret.
        "DeviceTokenKeySecretArn": (["", *one_secret], wildcards),
        "UserServiceUrl": (
            ["https://user.telematicssdk.com", "http://127.0.0.1:8081", "http://localhost:9000/base", "http://[::1]:1"],
            ["http://user.telematicssdk.com", "http://localhost.example.com", "ftp://user.telematicssdk.com", ""],
        ),
    }
    for name, (accepted, refused) in cases.items():
        pattern = template["Parameters"][name].get("AllowedPattern")
        if pattern is None:
            problems.append(f"{name}: no AllowedPattern")
            continue
        problems += [f"{name}: {value!r} is refused" for value in accepted if not re.fullmatch(pattern, value)]
        problems += [f"{name}: {value!r} is accepted" for value in refused if re.fullmatch(pattern, value)]
    return problems


def _calls_upstream(template: Template, function: str) -> bool:
    """Whether a function reads the instance credentials: it calls the upstream, under claims or leases."""
    role = role_of(template, function)
    return any(
        owner == role and allows(statement, "secretsmanager:GetSecretValue")
        for owner, statement in inline_policies(template)
    )


def _default_of(template: Template, value: Any) -> Any:
    """A literal of the template, or the default of the parameter it refers to."""
    name = value.get("Ref") if isinstance(value, dict) else None
    return value if name is None else template["Parameters"][name].get("Default")


def timing_problems(template: Template) -> list[str]:
    """Claims and leases outlive whoever holds them: every function that calls the upstream states its Timeout in
    FUNCTION_TIMEOUT_SECONDS, truthfully, and its settings (with the parameters' defaults) pass the model's checks
    of claim and lease lengths against it."""
    problems: list[str] = []
    fields = ServiceSettings.model_fields
    for function, props in resources(template, "AWS::Lambda::Function").items():
        variables = environment(template, function)
        declared = variables.get("FUNCTION_TIMEOUT_SECONDS")
        if declared is None:
            if _calls_upstream(template, function):
                problems.append(f"{function}: calls the upstream but does not set FUNCTION_TIMEOUT_SECONDS")
            continue
        if int(declared) != int(props.get("Timeout", 3)):
            problems.append(
                f"{function}: FUNCTION_TIMEOUT_SECONDS={declared} but its Timeout is {props.get('Timeout')}"
            )
        numbers = {
            name.lower(): _default_of(template, value)
            for name, value in variables.items()
            if name.lower() in fields and fields[name.lower()].annotation in (int, float, "int", "float")
        }
        try:
            ServiceSettings(**numbers)
        except ValidationError as exc:
            problems += [f"{function}: {error['msg']}" for error in exc.errors()]
    return problems


RULES: dict[str, Callable[[Template], list[str]]] = {
    "sqs sources": sqs_source_problems,
    "service writers": service_writer_problems,
    "signup invoke config": signup_invoke_config_problems,
    "tables": table_problems,
    "iam": iam_problems,
    "environment": environment_problems,
    "retries and dead letters": retry_and_dead_letter_problems,
    "reserved concurrency": concurrency_problems,
    "log groups": log_group_problems,
    "retention": retention_problems,
    "pairing": pairing_problems,
    "shards": shard_problems,
    "least privilege": least_privilege_problems,
    "parameter patterns": parameter_pattern_problems,
    "timing": timing_problems,
}


# --------------------------------------------------------------------------------------------- tests


def lint_problems(text: str) -> list[str]:
    return [
        f"{match.rule.id} {match.message} (line {match.linenumber})"
        for match in lint(text)
        if match.rule.severity in {"error", "warning"}
    ]


def test_the_sam_template_passes_cfn_lint() -> None:
    assert lint_problems(TEMPLATE.read_text(encoding="utf-8")) == []


def test_the_translated_template_passes_cfn_lint(cfn: Template, tmp_path: Path) -> None:
    path = tmp_path / "translated.json"
    path.write_text(json.dumps(cfn, indent=1), encoding="utf-8")
    assert lint_problems(path.read_text(encoding="utf-8")) == []


def test_translation_expands_every_serverless_resource(sam: Template, cfn: Template) -> None:
    kinds = {res["Type"] for res in cfn["Resources"].values()}
    assert not any(kind.startswith("AWS::Serverless::") for kind in kinds)
    for lid, res in sam["Resources"].items():
        if res["Type"] == "AWS::Serverless::Function":
            assert cfn["Resources"][lid]["Type"] == "AWS::Lambda::Function"


@pytest.mark.parametrize("rule", list(RULES))
def test_the_template_keeps_its_promises(cfn: Template, rule: str) -> None:
    assert RULES[rule](cfn) == []


def test_every_sqs_source_reports_partial_failures_and_bounds_concurrency(cfn: Template) -> None:
    mappings = sqs_mappings(cfn)
    assert {function_of(cfn, p["FunctionName"]) for p in mappings.values()} >= {
        "RegistrationQueueFunction",
        "RefreshWorkerFunction",
    }
    for props in mappings.values():
        assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
        assert min(possible_values(cfn, props["ScalingConfig"]["MaximumConcurrency"])) >= 2


def test_the_signup_function_retries_then_sends_failures_to_its_dead_letter_queue(cfn: Template) -> None:
    config = next(
        p
        for p in resources(cfn, "AWS::Lambda::EventInvokeConfig").values()
        if target(p["FunctionName"]) == "SignupFunction"
    )
    assert 0 <= int(config["MaximumRetryAttempts"]) <= 2
    assert target(config["DestinationConfig"]["OnFailure"]["Destination"]) == "SignupDeadLetterQueue"


def test_the_tokens_table_uses_the_template_key_and_pitr(cfn: Template) -> None:
    table = resources(cfn, "AWS::DynamoDB::Table")["TokensTable"]
    assert target(table["SSESpecification"]["KMSMasterKeyId"]) == "DataKey"
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True


def test_the_device_token_key_is_a_kept_encrypted_secret_that_only_the_functions_deriving_tokens_read(
    cfn: Template,
) -> None:
    secret = cfn["Resources"]["DeviceTokenKeySecret"]
    # Created unless an existing secret is given; kept through stack deletion and replacement like the table (not
    # after a failed first create, when no DeviceToken was derived with it yet).
    assert secret["Condition"] == "CreateDeviceTokenKey"
    assert cfn["Conditions"]["CreateDeviceTokenKey"] == {"Fn::Equals": [{"Ref": "DeviceTokenKeySecretArn"}, ""]}
    assert secret["DeletionPolicy"] == "RetainExceptOnCreate"
    assert secret["UpdateReplacePolicy"] == "Retain"
    props = secret["Properties"]
    assert target(props["KmsKeyId"]) == "DataKey"
    generated = props["GenerateSecretString"]
    assert int(generated["PasswordLength"]) >= 32
    assert generated["IncludeSpace"] is False
    assert "RotationSchedule" not in json.dumps(cfn["Resources"])

    secret_ref = {
        "Fn::If": ["CreateDeviceTokenKey", {"Ref": "DeviceTokenKeySecret"}, {"Ref": "DeviceTokenKeySecretArn"}]
    }
    readers = {
        owner
        for owner, statement in inline_policies(cfn)
        if allows(statement, "secretsmanager:GetSecretValue") and secret_ref in as_list(statement.get("Resource"))
    }
    functions = resources(cfn, "AWS::Lambda::Function")
    # The lifecycle function derives the slot a never-registered user's deletion tombstones; the drift audit derives
    # too: an unstored upstream user whose DeviceToken is ours for its ClientId is ours.
    deriving = {"SignupFunction", "RegistrationQueueFunction", "LifecycleFunction", "ReconcileFunction"}
    assert readers == {role_of(cfn, function) for function in deriving}
    for function in functions:
        variable = environment(cfn, function).get("DEVICE_TOKEN_KEY_SECRET_ARN")
        assert variable == (secret_ref if function in deriving else None), function


def test_each_function_needs_at_least_the_core_settings(cfn: Template) -> None:
    core = {"USER_SERVICE_URL", "CREDENTIALS_SECRET_ARN", "TOKENS_TABLE_NAME", "EVENT_BUS_NAME"}
    specific = {
        "SignupFunction": core | {"DEAD_LETTER_QUEUE_URL"},
        "RegistrationQueueFunction": core | {"DEAD_LETTER_QUEUE_URL", "REGISTRATION_QUEUE_URL"},
        "RefreshWorkerFunction": core,
        "RefreshSweeperFunction": {"TOKENS_TABLE_NAME", "REFRESH_QUEUE_URL"},
    }
    for function, needed in specific.items():
        used = {name.upper() for name in settings_used(handler_file(cfn, function))}
        assert needed <= used, f"{function}: the analysis of its code misses {needed - used}"
        assert needed <= set(environment(cfn, function)), function


# --------------------------------------------------------------------------------------------- the rules can fail


def _sam_resource(template: Template, lid: str) -> dict[str, Any]:
    resource: dict[str, Any] = template["Resources"][lid]
    return resource


def _props(template: Template, lid: str) -> dict[str, Any]:
    props: dict[str, Any] = _sam_resource(template, lid)["Properties"]
    return props


def _event(template: Template, function: str, event: str) -> dict[str, Any]:
    props: dict[str, Any] = _props(template, function)["Events"][event]["Properties"]
    return props


def _add_statement(template: Template, statement: dict[str, Any]) -> None:
    _props(template, "RefreshWorkerFunction")["Policies"][0]["Statement"].append(statement)


BREAKAGES: dict[str, tuple[Callable[[Template], Any], str, str]] = {
    "no partial batch responses": (
        lambda t: _event(t, "RegistrationQueueFunction", "Registrations").pop("FunctionResponseTypes"),
        "sqs sources",
        "ReportBatchItemFailures",
    ),
    "unbounded queue concurrency": (
        lambda t: _event(t, "RefreshWorkerFunction", "RefreshJobs").pop("ScalingConfig"),
        "sqs sources",
        "MaximumConcurrency",
    ),
    "queue without a DLQ": (
        lambda t: _props(t, "RegistrationQueue").pop("RedrivePolicy"),
        "sqs sources",
        "no RedrivePolicy",
    ),
    "short visibility timeout": (
        lambda t: _props(t, "RefreshQueue").update(VisibilityTimeout=120),
        "sqs sources",
        "VisibilityTimeout 120",
    ),
    "rule DLQ without a queue policy": (
        lambda t: t["Resources"].pop("SignupDeadLetterQueuePolicy"),
        "service writers",
        "events.amazonaws.com",
    ),
    "no async failure destination": (
        lambda t: _props(t, "SignupFunction").pop("EventInvokeConfig"),
        "signup invoke config",
        "no EventInvokeConfig",
    ),
    "table with an AWS-owned key": (
        lambda t: _props(t, "TokensTable").update(SSESpecification={"SSEEnabled": True}),
        "tables",
        "customer-managed",
    ),
    "no point-in-time recovery": (
        lambda t: _props(t, "TokensTable").pop("PointInTimeRecoverySpecification"),
        "tables",
        "point-in-time",
    ),
    "key of a retained table not retained": (
        lambda t: _sam_resource(t, "DataKey").pop("DeletionPolicy"),
        "tables",
        "unreadable",
    ),
    "service-wide action": (
        lambda t: _add_statement(
            t, {"Effect": "Allow", "Action": "dynamodb:*", "Resource": {"Fn::GetAtt": ["TokensTable", "Arn"]}}
        ),
        "iam",
        "dynamodb:*",
    ),
    "resource wildcard": (
        lambda t: _add_statement(t, {"Effect": "Allow", "Action": ["sqs:SendMessage"], "Resource": "*"}),
        "iam",
        "Resource '*'",
    ),
    "missing queue URL": (
        lambda t: _props(t, "SignupFunction")["Environment"]["Variables"].pop("DEAD_LETTER_QUEUE_URL"),
        "environment",
        "DEAD_LETTER_QUEUE_URL",
    ),
    "bulk continuations not allowed": (
        lambda t: _props(t, "RegistrationQueueFunction")["Policies"][0].update(
            Statement=[
                s
                for s in _props(t, "RegistrationQueueFunction")["Policies"][0]["Statement"]
                if s.get("Sid") != "BulkContinuations"
            ]
        ),
        "environment",
        "may not send to RegistrationQueue",
    ),
    "misspelt variable": (
        lambda t: _props(t, "RefreshWorkerFunction")["Environment"]["Variables"].update(REFRESH_MARGIN_SECOND="60"),
        "environment",
        "REFRESH_MARGIN_SECOND",
    ),
    "hard-coded table name": (
        lambda t: t["Globals"]["Function"]["Environment"]["Variables"].update(TOKENS_TABLE_NAME="tokens"),
        "environment",
        "literal 'tokens'",
    ),
    "schedule without a retry policy": (
        lambda t: _event(t, "RefreshSweeperFunction", "Sweep").pop("RetryPolicy"),
        "retries and dead letters",
        "RetryPolicy",
    ),
    "timeout raised without its claims": (
        lambda t: _props(t, "RegistrationQueueFunction").update(Timeout=300),
        "timing",
        "FUNCTION_TIMEOUT_SECONDS=60 but its Timeout is 300",
    ),
    "lease shorter than its calls": (
        lambda t: _props(t, "RefreshWorkerFunction")["Environment"]["Variables"].update(REFRESH_LEASE_SECONDS="60"),
        "timing",
        "REFRESH_LEASE_SECONDS=60 is too short",
    ),
    "schedule without a DLQ": (
        lambda t: _event(t, "RefreshSweeperFunction", "Sweep").pop("DeadLetterConfig"),
        "retries and dead letters",
        "DeadLetterConfig",
    ),
    "reserved concurrency that cannot be turned off": (
        lambda t: _props(t, "SignupFunction").update(ReservedConcurrentExecutions=10),
        "reserved concurrency",
        "SignupFunction: ReservedConcurrentExecutions cannot be turned off",
    ),
    "function without its log group": (
        lambda t: _props(t, "RefreshWorkerFunction").pop("LoggingConfig"),
        "log groups",
        "RefreshWorkerFunction: no LoggingConfig",
    ),
    "log group named from its function": (
        lambda t: _props(t, "SignupFunctionLogGroup").update(LogGroupName={"Fn::Sub": "/aws/lambda/${SignupFunction}"}),
        "log groups",
        "named from its function",
    ),
    "dead-letter queue deleted with the stack": (
        lambda t: _sam_resource(t, "SweepDeadLetterQueue").pop("DeletionPolicy"),
        "retention",
        "SweepDeadLetterQueue: DeletionPolicy None",
    ),
    "table kept after a failed first create": (
        lambda t: _sam_resource(t, "TokensTable").update(DeletionPolicy="Retain"),
        "retention",
        "billed orphan",
    ),
    "signup source with a default": (
        lambda t: t["Parameters"]["SignupEventSource"].update(Default="customer.app"),
        "pairing",
        "UserSignedUp rule's source",
    ),
    "fixed outcome source": (
        lambda t: t["Globals"]["Function"]["Environment"]["Variables"].update(OUTCOME_EVENT_SOURCE="telematics.x"),
        "pairing",
        "OUTCOME_EVENT_SOURCE",
    ),
    "shard count not in the index": (
        lambda t: _props(t, "TokensTable")["GlobalSecondaryIndexes"][1]["Projection"]["NonKeyAttributes"].pop(),
        "shards",
        "strands users",
    ),
    "kms:Encrypt granted": (
        lambda t: _props(t, "RefreshWorkerFunction")["Policies"][0]["Statement"][1]["Action"].append("kms:Encrypt"),
        "least privilege",
        "kms:Encrypt",
    ),
    "Query on RefreshDue granted to signup": (
        lambda t: _props(t, "SignupFunction")["Policies"][0]["Statement"].append(
            {
                "Effect": "Allow",
                "Action": "dynamodb:Query",
                "Resource": {"Fn::Sub": "${TokensTable.Arn}/index/RefreshDue"},
            }
        ),
        "least privilege",
        "may Query ['RefreshDue']",
    ),
    "sweeper may update any attribute": (
        lambda t: _props(t, "RefreshSweeperFunction")["Policies"][0]["Statement"][1].pop("Condition"),
        "least privilege",
        "UpdateItem not conditioned",
    ),
    "secret under a customer key unreadable": (
        lambda t: _props(t, "RefreshWorkerFunction")["Policies"][0]["Statement"].pop(3),
        "least privilege",
        "cannot decrypt a secret under a customer key",
    ),
    "secret pattern accepting a wildcard": (
        lambda t: t["Parameters"]["InstanceCredentialsSecretArn"].update(
            AllowedPattern="^arn:aws[a-z-]*:secretsmanager:.+"
        ),
        "parameter patterns",
        "secret:*' is accepted",
    ),
    "upstream URL in clear text": (
        lambda t: t["Parameters"]["UserServiceUrl"].pop("AllowedPattern"),
        "parameter patterns",
        "UserServiceUrl: no AllowedPattern",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_each_rule_fails_on_a_template_broken_the_way_it_is_about(sam: Template, tmp_path: Path, breakage: str) -> None:
    breaking, rule, expected = BREAKAGES[breakage]
    broken = copy.deepcopy(sam)
    breaking(broken)
    path = tmp_path / "template.yaml"
    path.write_text(yaml.safe_dump(broken, sort_keys=False), encoding="utf-8")

    problems = RULES[rule](translate(path))

    assert any(expected in problem for problem in problems), problems


def test_cfn_lint_fails_on_a_misspelt_property() -> None:
    # The first property of that name (a comment may name it too).
    template = TEMPLATE.read_text(encoding="utf-8")
    text = re.sub(r"^(\s+)VisibilityTimeout:", r"\1VisibilityTimeOut:", template, count=1, flags=re.MULTILINE)
    assert "VisibilityTimeOut:" in text
    assert any(problem.startswith("E3002") for problem in lint_problems(text))


def test_a_waiting_change_is_dead_lettered_with_its_reason_before_the_queue_gives_up(cfn: Template) -> None:
    """A lifecycle change comes back every VisibilityTimeout while its user's registration is awaited; the function
    dead-letters it ``unknown_user`` after UnknownUserSeconds. The queue's own redrive (maxReceiveCount, a letter
    without a reason) must come later, with two receives spare for transient failures, whatever the parameter."""
    queue = cfn["Resources"]["LifecycleQueue"]["Properties"]
    longest = int(cfn["Parameters"]["UnknownUserSeconds"]["MaxValue"])
    receives = int(queue["RedrivePolicy"]["maxReceiveCount"])
    assert longest <= (receives - 2) * int(queue["VisibilityTimeout"])
