"""The sweeper's role may UpdateItem only the attributes its code writes, with no item read back (template.yaml,
RefreshSweeperFunction, statement MarkQueued). moto does not enforce IAM, so this test holds the code to the
condition: every UpdateItem a real sweep makes names only those attributes and asks for no ReturnValues. A change
to the sweep's writes that would be denied on AWS fails here first."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3

from local.emulator.testing import EmulatorHandle
from local.lambda_runtime import environment
from local.stack import LocalStack, translate_template
from telematics_reg.settings import ServiceSettings
from telematics_reg.wiring import build_sweeper

from .conftest import ROOT, Functions, signup_event

_KEYWORDS = {"SET", "REMOVE", "ADD", "DELETE", "AND", "OR", "NOT", "BETWEEN", "IN"}
_FUNCTIONS = {"attribute_exists", "attribute_not_exists", "attribute_type", "begins_with", "contains", "size",
              "if_not_exists", "list_append"}  # fmt: skip


def attribute_names(params: dict[str, Any]) -> set[str]:
    """Top-level attribute names an UpdateItem request touches: its key, its update and its condition."""
    names = dict(params.get("ExpressionAttributeNames", {}))
    found = set(params["Key"])
    for expression in (params.get("UpdateExpression", ""), params.get("ConditionExpression", "")):
        text = re.sub(r":[A-Za-z0-9_]+", " ", expression)
        for token in re.findall(r"#?[A-Za-z_][A-Za-z0-9_]*", text):
            if token.startswith("#"):
                found.add(names[token])
            elif token.upper() not in _KEYWORDS and token not in _FUNCTIONS:
                found.add(token)
    return found


def sweeper_condition() -> dict[str, Any]:
    parameters = {"InstanceCredentialsSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:x-AbCdEf"}
    cfn = translate_template(ROOT / "template.yaml", parameters)
    role = cfn["Resources"]["RefreshSweeperFunction"]["Properties"]["Role"]["Fn::GetAtt"][0]
    for policy in cfn["Resources"][role]["Properties"]["Policies"]:
        for statement in policy["PolicyDocument"]["Statement"]:
            if statement.get("Sid") == "MarkQueued":
                condition: dict[str, Any] = statement["Condition"]
                return condition
    raise AssertionError("the sweeper's role has no MarkQueued statement")


@contextmanager
def recording_updates() -> Iterator[list[dict[str, Any]]]:
    """The parameters of every UpdateItem made by the boto3 clients created inside the block."""
    calls: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        calls.append(params)

    # Registered on boto3's default session, whose handlers every client made afterwards copies.
    if boto3.DEFAULT_SESSION is None:
        boto3.setup_default_session()
    session = boto3.DEFAULT_SESSION
    assert session is not None
    session.events.register("provide-client-params.dynamodb.UpdateItem", record)
    try:
        yield calls
    finally:
        session.events.unregister("provide-client-params.dynamodb.UpdateItem", record)


def test_every_update_of_a_sweep_stays_within_the_sweepers_iam_condition(
    stack: LocalStack, functions: Functions, emulator: EmulatorHandle
) -> None:
    condition = sweeper_condition()
    allowed = set(condition["ForAllValues:StringEquals"]["dynamodb:Attributes"])
    returns = condition["StringEqualsIfExists"]["dynamodb:ReturnValues"]
    result = functions.get("SignupFunction").invoke(signup_event({"ClientId": f"sweep-iam-{uuid.uuid4()}"}))
    assert result["status"] == "registered"

    overrides = {"REFRESH_MARGIN_SECONDS": "7200", "REFRESH_SPREAD_SECONDS": "0"}
    with environment(stack.function_environment("RefreshSweeperFunction") | overrides), recording_updates() as calls:
        report = build_sweeper(ServiceSettings()).sweep()

    assert report.queued >= 1
    assert calls, "the sweep made no UpdateItem: the test checks nothing"
    for params in calls:
        assert attribute_names(params) <= allowed, params["UpdateExpression"]
        assert params.get("ReturnValues", "NONE") in (returns if isinstance(returns, list) else [returns])
