"""local/stack.py provisions template.yaml itself into moto: what moto holds must be what the template says.

The expectations are read from template.yaml (not copied here), so a new queue, function or variable is checked
as soon as it is added.

moto keeps its state per process, account and region, and other suites may provision the same template in this
process; this module therefore uses its own region and stack name.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from local import moto_server
from local.stack import (
    SKIPPED_TYPES,
    LocalStack,
    LocalStackError,
    UnsupportedResourceError,
    check_resource_types,
    load_template,
    provision,
    translate_template,
)
from telematics_reg.settings import ServiceSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO_ROOT / "template.yaml"
REGION = "eu-west-1"
STACK = "infra-test"
CREDENTIALS = {"default": {"InstanceId": "instance-id", "InstanceKey": "instance-key"}}
SAM_FUNCTION = "AWS::Serverless::Function"


@pytest.fixture(scope="module")
def endpoint_url() -> Iterator[str]:
    server = moto_server.start()
    yield moto_server.endpoint(server)
    server.stop()


@pytest.fixture(scope="module")
def stack(endpoint_url: str) -> LocalStack:
    return provision(
        endpoint_url, template_path=TEMPLATE_PATH, stack_name=STACK, region=REGION, instance_credentials=CREDENTIALS
    )


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template(TEMPLATE_PATH)


def client(stack: LocalStack, service: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=stack.endpoint_url,
        region_name=stack.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def resources_of(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {lid: res.get("Properties", {}) for lid, res in template["Resources"].items() if res["Type"] == kind}


def condition_holds(stack: LocalStack, name: str) -> bool:
    """A condition of the template (only the forms it uses: Equals of a parameter and a string, and Not)."""

    def holds(expression: Any) -> bool:
        if "Fn::Not" in expression:
            return not holds(expression["Fn::Not"][0])
        left, right = expression["Fn::Equals"]
        return bool(expected_value(stack, left) == expected_value(stack, right))

    return holds(load_template(TEMPLATE_PATH)["Conditions"][name])


def expected_value(stack: LocalStack, raw: Any) -> str:
    """What a template value must have become locally (only the forms the template uses for names)."""
    if isinstance(raw, dict) and "Ref" in raw:
        name = raw["Ref"]
        return stack.parameters[name] if name in stack.parameters else stack.physical[name]
    if isinstance(raw, dict) and "Fn::GetAtt" in raw:
        logical_id, attribute = raw["Fn::GetAtt"]
        return stack.attributes[logical_id][attribute]
    if isinstance(raw, dict) and "Fn::If" in raw:
        condition, when_true, when_false = raw["Fn::If"]
        return expected_value(stack, when_true if condition_holds(stack, condition) else when_false)
    if isinstance(raw, dict) and "Fn::Join" in raw:
        separator, parts = raw["Fn::Join"]
        return str(separator).join(expected_value(stack, part) for part in parts)
    assert not isinstance(raw, dict | list), f"extend expected_value() for {raw!r}"
    return "true" if raw is True else "false" if raw is False else str(raw)


# ------------------------------------------------------------------------------------------------ coverage


def test_every_resource_is_provisioned_or_deliberately_skipped(stack: LocalStack) -> None:
    # Given the template as CloudFormation sees it after the SAM transform
    translated = translate_template(TEMPLATE_PATH, stack.parameters, region=REGION)

    # Then every resource type is handled, and every resource exists in the local stack
    check_resource_types(translated)
    # (resources under a condition exist only when it holds: no AlarmEmail given, no subscription; no existing
    # DeviceToken key secret given, so the stack makes one)
    conditional = {lid for lid, resource in translated["Resources"].items() if "Condition" in resource}
    assert conditional == {"AlarmEmailSubscription", "DeviceTokenKeySecret"}
    assert set(stack.resource_types) == set(translated["Resources"]) - {"AlarmEmailSubscription"}
    assert all(stack.resource_types[lid] in SKIPPED_TYPES for lid in stack.skipped)
    assert not {kind for kind in stack.resource_types.values() if kind.startswith("AWS::Serverless")}


def test_outputs_are_resolved(stack: LocalStack, template: dict[str, Any]) -> None:
    assert set(stack.outputs) == set(template["Outputs"])
    for name, output in template["Outputs"].items():
        assert stack.outputs[name] == expected_value(stack, output["Value"]), name
    key = client(stack, "kms").describe_key(KeyId=stack.outputs["DataKeyArn"])["KeyMetadata"]
    assert key["KeyState"] == "Enabled"


# ------------------------------------------------------------------------------------------------ data


def test_tokens_table_has_the_template_keys_indexes_and_encryption(stack: LocalStack, template: dict[str, Any]) -> None:
    props = template["Resources"]["TokensTable"]["Properties"]
    dynamodb = client(stack, "dynamodb")

    table = dynamodb.describe_table(TableName=stack.physical["TokensTable"])["Table"]

    assert table["KeySchema"] == props["KeySchema"]
    assert sorted(table["AttributeDefinitions"], key=str) == sorted(props["AttributeDefinitions"], key=str)
    assert table["BillingModeSummary"]["BillingMode"] == props["BillingMode"]
    indexes = {index["IndexName"]: index for index in table["GlobalSecondaryIndexes"]}
    assert set(indexes) == {"ByClient", "RefreshDue"}
    for expected in props["GlobalSecondaryIndexes"]:
        index = indexes[expected["IndexName"]]
        assert index["KeySchema"] == expected["KeySchema"]
        assert index["Projection"]["ProjectionType"] == expected["Projection"]["ProjectionType"]
        # A name may be a !Sub of parameters (RefreshDue carries the shard count in its definition).
        expected_names = [
            re.sub(r"\$\{(\w+)\}", lambda m: stack.parameters[m.group(1)], name["Fn::Sub"])
            if isinstance(name, dict)
            else name
            for name in expected["Projection"]["NonKeyAttributes"]
        ]
        assert sorted(index["Projection"]["NonKeyAttributes"]) == sorted(expected_names)
    # Encrypted with the template's customer-managed key, not the AWS-owned one.
    assert table["SSEDescription"]["Status"] == "ENABLED"
    assert table["SSEDescription"]["SSEType"] == "KMS"
    assert table["SSEDescription"]["KMSMasterKeyArn"].endswith(stack.physical["DataKey"])
    assert table["DeletionProtectionEnabled"] is True
    backups = dynamodb.describe_continuous_backups(TableName=stack.physical["TokensTable"])
    assert backups["ContinuousBackupsDescription"]["PointInTimeRecoveryDescription"]["PointInTimeRecoveryStatus"] == (
        "ENABLED"
    )


def test_queues_have_the_template_attributes(stack: LocalStack, template: dict[str, Any]) -> None:
    sqs = client(stack, "sqs")
    queues = resources_of(template, "AWS::SQS::Queue")
    assert {"RegistrationQueue", "RegistrationDeadLetterQueue", "SignupDeadLetterQueue"} <= set(queues)

    for logical_id, props in queues.items():
        attributes = sqs.get_queue_attributes(QueueUrl=stack.queue_url(logical_id), AttributeNames=["All"])[
            "Attributes"
        ]
        assert attributes["QueueArn"] == stack.queue_arn(logical_id)
        assert attributes["VisibilityTimeout"] == str(props.get("VisibilityTimeout", 30)), logical_id
        assert attributes["MessageRetentionPeriod"] == str(props.get("MessageRetentionPeriod", 345600)), logical_id
        if "KmsMasterKeyId" in props:
            assert attributes["KmsMasterKeyId"] == expected_value(stack, props["KmsMasterKeyId"]), logical_id
        if "RedrivePolicy" in props:
            redrive = json.loads(attributes["RedrivePolicy"])
            dead_letter_id = props["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
            assert redrive["deadLetterTargetArn"] == stack.queue_arn(dead_letter_id), logical_id
            assert int(redrive["maxReceiveCount"]) == props["RedrivePolicy"]["maxReceiveCount"], logical_id


def test_registration_queue_redrives_to_its_dead_letter_queue(stack: LocalStack, template: dict[str, Any]) -> None:
    attributes = client(stack, "sqs").get_queue_attributes(
        QueueUrl=stack.queue_url("RegistrationQueue"), AttributeNames=["RedrivePolicy", "VisibilityTimeout"]
    )["Attributes"]

    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == stack.queue_arn("RegistrationDeadLetterQueue")
    assert int(redrive["maxReceiveCount"]) == 5
    assert attributes["VisibilityTimeout"] == "360"


def test_queue_policy_lets_the_signup_rule_dead_letter(stack: LocalStack) -> None:
    attributes = client(stack, "sqs").get_queue_attributes(
        QueueUrl=stack.queue_url("SignupDeadLetterQueue"), AttributeNames=["Policy"]
    )["Attributes"]

    (statement,) = json.loads(attributes["Policy"])["Statement"]
    assert statement["Resource"] == stack.queue_arn("SignupDeadLetterQueue")
    assert statement["Condition"]["ArnEquals"]["aws:SourceArn"] == stack.attributes["SignupFunctionUserSignedUp"]["Arn"]


def test_instance_credentials_secret_is_created_and_passed_as_the_parameter(stack: LocalStack) -> None:
    arn = stack.parameters["InstanceCredentialsSecretArn"]

    secret = client(stack, "secretsmanager").get_secret_value(SecretId=arn)

    assert secret["Name"] == f"{STACK}-instance-credentials"
    assert json.loads(secret["SecretString"]) == CREDENTIALS


def test_the_device_token_key_secret_is_generated_encrypted_and_given_to_the_registration_functions(
    stack: LocalStack,
) -> None:
    arn = stack.physical["DeviceTokenKeySecret"]
    secretsmanager = client(stack, "secretsmanager")

    value = secretsmanager.get_secret_value(SecretId=arn)["SecretString"]
    described = secretsmanager.describe_secret(SecretId=arn)

    assert len(value) == 64
    assert value.isalnum()  # ExcludePunctuation, no space
    assert described["KmsKeyId"] == stack.attributes["DataKey"]["Arn"]
    assert stack.outputs["DeviceTokenKeySecretArn"] == arn
    for logical_id in ("SignupFunction", "RegistrationQueueFunction"):
        assert stack.functions[logical_id].environment["DEVICE_TOKEN_KEY_SECRET_ARN"] == arn
    for logical_id in ("RefreshWorkerFunction", "RefreshSweeperFunction"):
        assert "DEVICE_TOKEN_KEY_SECRET_ARN" not in stack.functions[logical_id].environment


# ------------------------------------------------------------------------------------------------ functions


def test_function_environments_are_complete_and_resolved(stack: LocalStack, template: dict[str, Any]) -> None:
    globals_env = template["Globals"]["Function"]["Environment"]["Variables"]
    functions = resources_of(template, SAM_FUNCTION)
    assert set(stack.functions) == set(functions)

    for logical_id, props in functions.items():
        declared = {**globals_env, **props.get("Environment", {}).get("Variables", {})}
        environment = stack.functions[logical_id].environment

        assert set(environment) == set(declared), logical_id
        for name, raw in declared.items():
            assert environment[name] == expected_value(stack, raw), f"{logical_id} {name}"
        assert all(isinstance(value, str) and "{" not in value for value in environment.values()), logical_id


def test_function_specs_follow_the_template(stack: LocalStack, template: dict[str, Any]) -> None:
    function_globals = template["Globals"]["Function"]
    for logical_id, props in resources_of(template, SAM_FUNCTION).items():
        spec = stack.functions[logical_id]

        assert spec.code_path == str((REPO_ROOT / props["CodeUri"]).resolve())
        module, _, function_name = spec.handler.rpartition(".")
        assert (Path(spec.code_path) / f"{module}.py").is_file(), spec.handler
        assert function_name == "lambda_handler"
        assert spec.timeout == props.get("Timeout", function_globals["Timeout"])
        assert spec.memory == props.get("MemorySize", function_globals["MemorySize"])
        assert spec.layers == [str((REPO_ROOT / "layers/telematics").resolve())]


def test_function_environment_points_a_handler_at_moto(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given only the environment a handler gets (no explicit endpoint, no real credentials)
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    environment = stack.function_environment("RegistrationQueueFunction")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    # Then plain boto3 clients reach the stack's resources in moto
    table = boto3.client("dynamodb").describe_table(TableName=environment["TOKENS_TABLE_NAME"])["Table"]
    assert table["TableArn"] == stack.attributes["TokensTable"]["Arn"]
    queue = boto3.client("sqs").get_queue_attributes(QueueUrl=environment["DEAD_LETTER_QUEUE_URL"])
    assert queue["ResponseMetadata"]["HTTPStatusCode"] == 200
    secret = boto3.client("secretsmanager").get_secret_value(SecretId=environment["CREDENTIALS_SECRET_ARN"])
    assert json.loads(secret["SecretString"]) == CREDENTIALS
    assert environment["AWS_ENDPOINT_URL"] == stack.endpoint_url
    assert environment["AWS_DEFAULT_REGION"] == REGION


def test_function_environment_satisfies_the_settings_model(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    for logical_id in stack.functions:
        with monkeypatch.context() as patch:
            for name, value in stack.function_environment(logical_id).items():
                patch.setenv(name, value)
            settings = ServiceSettings()

        assert settings.tokens_table_name == stack.physical["TokensTable"], logical_id
        assert settings.credentials_secret_arn == stack.parameters["InstanceCredentialsSecretArn"], logical_id


def test_queue_functions_have_their_event_source_mappings(stack: LocalStack, template: dict[str, Any]) -> None:
    expected = {
        (logical_id, event["Properties"]["Queue"]["Fn::GetAtt"][0]): event["Properties"]
        for logical_id, props in resources_of(template, SAM_FUNCTION).items()
        for event in props.get("Events", {}).values()
        if event["Type"] == "SQS"
    }
    mappings = {(mapping.function, mapping.source_logical_id): mapping for mapping in stack.event_source_mappings}
    assert set(mappings) == set(expected)

    for key, props in expected.items():
        mapping = mappings[key]
        assert mapping.queue_url == stack.queue_url(key[1])
        assert mapping.event_source_arn == stack.queue_arn(key[1])
        assert mapping.batch_size == props["BatchSize"]
        assert mapping.batching_window == props["MaximumBatchingWindowInSeconds"]
        assert mapping.function_response_types == ["ReportBatchItemFailures"]
        assert str(mapping.maximum_concurrency) == expected_value(stack, props["ScalingConfig"]["MaximumConcurrency"])


def test_signup_function_failures_go_to_its_dead_letter_queue(stack: LocalStack) -> None:
    config = stack.event_invoke_configs["SignupFunction"]

    assert config["MaximumRetryAttempts"] == 2
    assert config["DestinationConfig"]["OnFailure"]["Destination"] == stack.queue_arn("SignupDeadLetterQueue")


# ------------------------------------------------------------------------------------------------ events


def test_signup_rule_is_on_the_bus_with_the_template_pattern(stack: LocalStack, template: dict[str, Any]) -> None:
    event = template["Resources"]["SignupFunction"]["Properties"]["Events"]["UserSignedUp"]["Properties"]
    (rule,) = [rule for rule in stack.rules if rule.logical_id == "SignupFunctionUserSignedUp"]
    expected_pattern = {"source": [stack.parameters["SignupEventSource"]], "detail-type": ["UserSignedUp"]}

    described = client(stack, "events").describe_rule(
        Name=rule.name, EventBusName=stack.parameters["SignupEventBusName"]
    )

    assert rule.bus == stack.parameters["SignupEventBusName"]
    assert json.loads(described["EventPattern"]) == expected_pattern == rule.event_pattern
    (target,) = rule.targets
    assert target.function == "SignupFunction"
    assert target.retry_policy == event["RetryPolicy"]
    assert target.dead_letter_arn == stack.queue_arn("SignupDeadLetterQueue")


def test_a_matching_event_reaches_the_rule_tap(stack: LocalStack) -> None:
    # moto cannot invoke a Lambda target: the rule delivers to a tap queue the local router polls instead.
    (rule,) = [rule for rule in stack.rules if rule.logical_id == "SignupFunctionUserSignedUp"]
    (target,) = rule.targets
    assert target.tap_queue_url is not None
    detail = {"ClientId": "client-1", "FirstName": "Ada"}

    result = client(stack, "events").put_events(
        Entries=[
            {
                "Source": stack.parameters["SignupEventSource"],
                "DetailType": "UserSignedUp",
                "Detail": json.dumps(detail),
                "EventBusName": rule.bus,
            }
        ]
    )

    assert result["FailedEntryCount"] == 0
    messages = client(stack, "sqs").receive_message(QueueUrl=target.tap_queue_url, WaitTimeSeconds=1)["Messages"]
    event = json.loads(messages[0]["Body"])
    assert event["detail-type"] == "UserSignedUp"
    assert event["detail"] == detail


def test_refresh_schedule_exists_and_targets_the_sweeper(stack: LocalStack) -> None:
    (schedule,) = [schedule for schedule in stack.schedules if schedule.logical_id == "RefreshSweeperFunctionSweep"]

    described = client(stack, "scheduler").get_schedule(Name=schedule.name, GroupName=schedule.group)

    assert described["ScheduleExpression"] == stack.parameters["RefreshScheduleExpression"] == schedule.expression
    assert schedule.function == "RefreshSweeperFunction"
    assert described["Target"]["Arn"] == stack.functions["RefreshSweeperFunction"].arn
    assert schedule.dead_letter_arn == stack.queue_arn("SweepDeadLetterQueue")


# ------------------------------------------------------------------------------------------------ state file


def test_saved_stack_loads_back_equal(stack: LocalStack, tmp_path: Path) -> None:
    path = stack.save(tmp_path / "state" / "stack.json")

    assert LocalStack.load(path) == stack


# ------------------------------------------------------------------------------------------------ edge cases


def write_template(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "template.yaml"
    path.write_text('AWSTemplateFormatVersion: "2010-09-09"\nTransform: AWS::Serverless-2016-10-31\n' + body)
    return path


def queue_names(endpoint_url: str, prefix: str) -> list[str]:
    sqs = boto3.client(
        "sqs", endpoint_url=endpoint_url, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    urls: list[str] = sqs.list_queues(QueueNamePrefix=prefix).get("QueueUrls", [])
    return urls


def test_an_unknown_resource_type_is_a_clear_error_and_creates_nothing(endpoint_url: str, tmp_path: Path) -> None:
    path = write_template(
        tmp_path,
        textwrap.dedent(
            """
            Resources:
              Jobs:
                Type: AWS::SQS::Queue
              Workflow:
                Type: AWS::StepFunctions::Activity
                Properties:
                  Name: workflow
            """
        ),
    )

    with pytest.raises(UnsupportedResourceError, match=r"Workflow: resource type AWS::StepFunctions::Activity") as info:
        provision(endpoint_url, template_path=path, stack_name="unknown-type", region=REGION)

    assert "SKIPPED_TYPES" in str(info.value)
    assert queue_names(endpoint_url, "unknown-type") == []


def test_intrinsics_conditions_and_parameters_resolve(endpoint_url: str, tmp_path: Path) -> None:
    path = write_template(
        tmp_path,
        textwrap.dedent(
            """
            Parameters:
              Stage: {Type: String, Default: dev, AllowedValues: [dev, prod]}
              Zones: {Type: CommaDelimitedList, Default: "a,b,c"}
              Size: {Type: Number, Default: 3}
            Mappings:
              Retention: {dev: {Seconds: 60}, prod: {Seconds: 1209600}}
            Conditions:
              IsProd: !Equals [!Ref Stage, prod]
              IsDev: !Not [!Condition IsProd]
              Both: !And [!Condition IsDev, !Or [!Condition IsProd, !Equals [!Ref Size, 3]]]
            Resources:
              Jobs:
                Type: AWS::SQS::Queue
                Properties:
                  QueueName: !Sub "${AWS::StackName}-jobs-${Stage}"
                  MessageRetentionPeriod: !FindInMap [Retention, !Ref Stage, Seconds]
                  DelaySeconds: !If [IsProd, 5, !Ref AWS::NoValue]
              ProdOnly:
                Type: AWS::SQS::Queue
                Condition: IsProd
            Outputs:
              Sub: {Value: !Sub ["${Name}/${Jobs.QueueName}@${AWS::Region}:${!Literal}", {Name: !Ref Stage}]}
              Join: {Value: !Join ["|", [!Ref Stage, !GetAtt Jobs.Arn]]}
              Select: {Value: !Select [1, !Ref Zones]}
              Split: {Value: !Select [2, !Split ["-", !Sub "${AWS::StackName}-x"]]}
              If: {Value: !If [Both, both, neither]}
              ProdOnly: {Value: !Ref ProdOnly, Condition: IsProd}
            """
        ),
    )

    local = provision(endpoint_url, template_path=path, stack_name="intrinsic-test", region=REGION)

    assert local.outputs == {
        "Sub": f"dev/intrinsic-test-jobs-dev@{REGION}:${{Literal}}",
        "Join": f"dev|arn:aws:sqs:{REGION}:123456789012:intrinsic-test-jobs-dev",
        "Select": "b",
        "Split": "x",
        "If": "both",
    }
    assert "ProdOnly" not in local.resource_types
    attributes = client(local, "sqs").get_queue_attributes(QueueUrl=local.queue_url("Jobs"), AttributeNames=["All"])
    assert attributes["Attributes"]["MessageRetentionPeriod"] == "60"
    assert attributes["Attributes"]["DelaySeconds"] == "0"  # AWS::NoValue removed the property


VALID_SECRET_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:credentials-AbCdEf"


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({}, r"InstanceCredentialsSecretArn has no Default"),
        ({"InstanceCredentialsSecretArn": "not-an-arn"}, r"does not match"),
        ({"InstanceCredentialsSecretArn": VALID_SECRET_ARN, "LogLevel": "LOUD"}, r"not one of"),
        ({"InstanceCredentialsSecretArn": VALID_SECRET_ARN, "UpstreamConcurrency": "0"}, r"below MinValue"),
        ({"InstanceCredentialsSecretArn": VALID_SECRET_ARN, "Typo": "1"}, r"not declared.*Typo"),
    ],
)
def test_bad_parameters_fail_before_anything_is_created(
    endpoint_url: str, parameters: dict[str, str], message: str
) -> None:
    with pytest.raises(LocalStackError, match=message):
        provision(endpoint_url, template_path=TEMPLATE_PATH, parameters=parameters, stack_name="bad", region=REGION)

    assert queue_names(endpoint_url, "bad-") == []


def test_a_custom_signup_bus_is_created_and_carries_the_rule(endpoint_url: str) -> None:
    # Another region: the template's schedule has a fixed name, so a second copy cannot share a region.
    local = provision(
        endpoint_url,
        template_path=TEMPLATE_PATH,
        parameters={"SignupEventBusName": "customer-bus"},
        stack_name=STACK,
        region="eu-west-2",
        instance_credentials=CREDENTIALS,
    )

    (rule,) = [rule for rule in local.rules if rule.logical_id == "SignupFunctionUserSignedUp"]
    assert rule.bus == "customer-bus"
    assert client(local, "events").describe_rule(Name=rule.name, EventBusName="customer-bus")["Arn"] == rule.arn
    assert all(spec.environment["EVENT_BUS_NAME"] == "customer-bus" for spec in local.functions.values())


def test_observability_and_deployment_resources_are_skipped_yet_resolvable(endpoint_url: str, tmp_path: Path) -> None:
    # Given resources the template is likely to grow: an alias, a schedule rule, alarms, a dashboard, a topic
    (tmp_path / "src").mkdir()
    path = write_template(
        tmp_path,
        textwrap.dedent(
            """
            Resources:
              Jobs:
                Type: AWS::SQS::Queue
              AlarmTopic:
                Type: AWS::SNS::Topic
              Worker:
                Type: AWS::Serverless::Function
                Properties:
                  CodeUri: src/
                  Handler: app.handler
                  Runtime: python3.11
                  AutoPublishAlias: live
                  Environment:
                    Variables:
                      ALARM_TOPIC_ARN: !Ref AlarmTopic
                  Events:
                    Jobs:
                      Type: SQS
                      Properties: {Queue: !GetAtt Jobs.Arn}
                    Nightly:
                      Type: Schedule
                      Properties: {Schedule: rate(1 day)}
              WorkerLogs:
                Type: AWS::Logs::LogGroup
                Properties:
                  LogGroupName: !Sub /aws/lambda/${Worker}
              JobsAgeAlarm:
                Type: AWS::CloudWatch::Alarm
                Properties:
                  Namespace: AWS/SQS
                  MetricName: ApproximateAgeOfOldestMessage
                  Dimensions: [{Name: QueueName, Value: !GetAtt Jobs.QueueName}]
                  Statistic: Maximum
                  Period: 60
                  EvaluationPeriods: 1
                  Threshold: 600
                  ComparisonOperator: GreaterThanThreshold
                  AlarmActions: [!Ref AlarmTopic]
              Dashboard:
                Type: AWS::CloudWatch::Dashboard
                Properties:
                  DashboardBody: !Sub '{"widgets": [{"type": "text", "properties": {"markdown": "${Jobs.QueueName}"}}]}'
            Outputs:
              LogGroup: {Value: !Ref WorkerLogs}
            """
        ),
    )

    local = provision(endpoint_url, template_path=path, stack_name="skip-test", region=REGION)

    assert {"AWS::SNS::Topic", "AWS::Lambda::Version", "AWS::Lambda::Alias", "AWS::CloudWatch::Alarm"} <= set(
        local.skipped.values()
    )
    worker = local.functions["Worker"]
    assert worker.code_path == str((tmp_path / "src").resolve())
    assert worker.environment["ALARM_TOPIC_ARN"] == f"arn:aws:sns:{REGION}:123456789012:skip-test-AlarmTopic"
    assert local.outputs["LogGroup"] == f"/aws/lambda/{worker.name}"
    # The queue's mapping names the alias; it still resolves to the function.
    (mapping,) = local.event_source_mappings
    assert (mapping.function, mapping.queue_url) == ("Worker", local.queue_url("Jobs"))
    (rule,) = local.rules
    assert rule.schedule_expression == "rate(1 day)"
    assert rule.targets[0].function == "Worker"
    assert client(local, "cloudwatch").describe_alarms(AlarmNamePrefix="skip-test")["MetricAlarms"] == []
