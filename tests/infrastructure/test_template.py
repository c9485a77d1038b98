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
        retained = resource.get("DeletionPolicy") == "Retain"
        if retained and key in keys and template["Resources"][key].get("DeletionPolicy") != "Retain":
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
    # Created unless an existing secret is given; kept through stack deletion and replacement like the table.
    assert secret["Condition"] == "CreateDeviceTokenKey"
    assert cfn["Conditions"]["CreateDeviceTokenKey"] == {"Fn::Equals": [{"Ref": "DeviceTokenKeySecretArn"}, ""]}
    assert secret["DeletionPolicy"] == secret["UpdateReplacePolicy"] == "Retain"
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
    text = TEMPLATE.read_text(encoding="utf-8").replace("VisibilityTimeout:", "VisibilityTimeOut:", 1)
    assert any(problem.startswith("E3002") for problem in lint_problems(text))
