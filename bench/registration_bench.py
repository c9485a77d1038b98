"""Registration pipeline benchmark: the queue function against the emulator at a fixed upstream latency.

Usage (from the repository root): ``.venv/bin/python bench/registration_bench.py [--latency-ms 50]
[--registrations 2000] [--invocations 5] [--per-invocation 10]``

Measures, in one run:

1. one upstream round trip (a Create through the client) and one batch of 10 records through the queue
   handler, as a ratio (target: under 2, i.e. the batch's records run concurrently);
2. throughput of ``--registrations`` queued registrations through the queue handler with ``--invocations``
   concurrent invocations (the template's QueueMaximumConcurrency) of ``--per-invocation`` concurrent records
   (UpstreamConcurrency), as a ratio of the ideal ``latency x registrations / (invocations x per-invocation)``
   (target: at least 0.7);
3. peak memory (max RSS) of a fresh process running one invocation with a batch of 10 (target: under 128 MB).

Each of 1 and 2 is measured twice: on the full local stack (the handler as deployed, DynamoDB, SQS and
EventBridge in a moto server) and with the AWS services replaced by the in-memory fakes of the library (same
handler code path, same HTTP client and emulator). On a 2-core machine the first is bound by CPU shared between
moto, the emulator and the handler; the second shows how well the pipeline overlaps upstream latency, which is
what bounds it on AWS. The handler's own CPU time per registration is reported too.

Results are printed as a markdown table and written to ``bench/results/registration.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import REPO_ROOT, machine, moto_server, stamp

from local.emulator.testing import running_emulator
from local.fake_store import InMemoryTokenStore
from local.fakes import RecordingDeadLetters, RecordingPublisher, StaticDeviceTokenKey
from local.lambda_runtime import LocalFunction
from local.stack import LocalStack, provision
from telematics_reg.credentials import StaticCredentials
from telematics_reg.intake import RegistrationIntake
from telematics_reg.models import CreateUserRequest, InstanceCredentials, build_models
from telematics_reg.registration import RegistrationService
from telematics_reg.upstream import UserServiceClient

INSTANCES = {"default": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())}}


def sqs_event(bodies: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": "bench",
                "body": json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "0"},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            }
            for body in bodies
        ]
    }


def queue_function(stack: LocalStack, per_invocation: int) -> LocalFunction:
    spec = stack.functions["RegistrationQueueFunction"]
    assert spec.code_path is not None
    env = stack.function_environment("RegistrationQueueFunction") | {
        "UPSTREAM_CONCURRENCY": str(per_invocation),
        "POWERTOOLS_LOG_LEVEL": "WARNING",
        "POWERTOOLS_METRICS_DISABLED": "true",
    }
    return LocalFunction(
        "RegistrationQueueFunction", handler=spec.handler, code_path=Path(spec.code_path), environment=env
    ).warm()


class InMemoryFunction:
    """The queue handler's code path with the AWS services replaced by in-memory fakes."""

    def __init__(self, url: str, per_invocation: int) -> None:
        sys.path.insert(0, str(REPO_ROOT / "functions" / "registration_queue"))
        import handle_registration_queue  # noqa: PLC0415 - a function folder, not a package

        self._handle = handle_registration_queue.handle_registration_batch
        build_models()  # as the function's set-up does, before batches validate on several threads
        publisher = RecordingPublisher()
        service = RegistrationService(
            upstream=UserServiceClient(url, max_connections=per_invocation * 8),
            store=InMemoryTokenStore(),
            credentials=StaticCredentials(INSTANCES),
            device_token_key=StaticDeviceTokenKey(uuid.uuid4().hex),
            publisher=publisher,
        )
        self._intake = RegistrationIntake(service=service, dead_letters=RecordingDeadLetters(), publisher=publisher)
        self._concurrency = per_invocation

    def invoke(self, event: dict[str, Any]) -> Any:
        return self._handle(event, self._intake, concurrency=self._concurrency)


def round_trip(url: str, samples: int = 20) -> float:
    creds = InstanceCredentials.model_validate(INSTANCES["default"])
    client = UserServiceClient(url)
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        client.create(creds, CreateUserRequest.model_validate({"CustomToken": str(uuid.uuid4())}))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batch_time(fn: LocalFunction | InMemoryFunction, queue_arn: str, samples: int = 10) -> float:
    times = []
    for _ in range(samples):
        event = sqs_event([{"ClientId": f"batch-{uuid.uuid4()}"} for _ in range(10)], queue_arn)
        start = time.perf_counter()
        response = fn.invoke(event)
        times.append(time.perf_counter() - start)
        assert response == {"batchItemFailures": []}, response
    return statistics.median(times)


def throughput(
    fn: LocalFunction | InMemoryFunction, queue_arn: str, registrations: int, invocations: int
) -> tuple[float, float, int]:
    batches = [
        sqs_event([{"ClientId": f"load-{uuid.uuid4()}"} for _ in range(10)], queue_arn)
        for _ in range(registrations // 10)
    ]
    start, cpu_start = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=invocations) as pool:
        responses = list(pool.map(fn.invoke, batches))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    failures = sum(len(r["batchItemFailures"]) for r in responses)
    return elapsed, cpu, failures


PEAK_MEMORY_SCRIPT = """
import json, resource, sys, uuid
from pathlib import Path
sys.path[:0] = [{root!r}, {layer!r}]
from local.lambda_runtime import LocalFunction
env = json.loads(sys.argv[1])
fn = LocalFunction("RegistrationQueueFunction", handler={handler!r}, code_path=Path({code!r}), environment=env).warm()
records = [{{"messageId": str(uuid.uuid4()), "receiptHandle": "x",
            "body": json.dumps({{"ClientId": f"mem-{{uuid.uuid4()}}"}}), "attributes": {{}},
            "messageAttributes": {{}}, "md5OfBody": "", "eventSource": "aws:sqs",
            "eventSourceARN": {arn!r}, "awsRegion": "us-east-1"}} for _ in range(10)]
assert fn.invoke({{"Records": records}}) == {{"batchItemFailures": []}}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_memory_mb(stack: LocalStack) -> float:
    spec = stack.functions["RegistrationQueueFunction"]
    env = stack.function_environment("RegistrationQueueFunction") | {"POWERTOOLS_LOG_LEVEL": "WARNING"}
    script = PEAK_MEMORY_SCRIPT.format(
        root=str(REPO_ROOT),
        layer=str(REPO_ROOT / "layers" / "telematics"),
        handler=spec.handler,
        code=spec.code_path,
        arn=stack.queue_arn("RegistrationQueue"),
    )
    output = subprocess.run(
        [sys.executable, "-c", script, json.dumps(env)], capture_output=True, text=True, check=True
    ).stdout
    return int(output.strip().splitlines()[-1]) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=int, default=50)
    parser.add_argument("--registrations", type=int, default=2000)
    parser.add_argument(
        "--invocations",
        default="1,5",
        help="concurrent invocations to measure, comma-separated (QueueMaximumConcurrency; default 1,5)",
    )
    parser.add_argument("--per-invocation", type=int, default=10, help="records in flight per invocation")
    args = parser.parse_args(argv)

    with moto_server() as endpoint, running_emulator(instances=INSTANCES) as emulator:
        print(f"emulator {emulator.login_limit_line}")
        stack = provision(
            endpoint,
            template_path=REPO_ROOT / "template.yaml",
            parameters={"UserServiceUrl": emulator.url},
            stack_name="bench",
            instance_credentials=INSTANCES,
        )
        emulator.set_faults(latency_ms=args.latency_ms)
        arn = stack.queue_arn("RegistrationQueue")
        rtt = round_trip(emulator.url)
        rows = [("upstream round trip (Create, median of 20)", f"{rtt * 1000:.1f} ms", "")]
        failures = 0
        for label, fn in (
            ("moto", queue_function(stack, args.per_invocation)),
            ("in-memory AWS", InMemoryFunction(emulator.url, args.per_invocation)),
        ):
            batch = batch_time(fn, arn)
            rows.append(
                (
                    f"batch of 10 through the queue handler, {label} (median of 10)",
                    f"{batch * 1000:.1f} ms",
                    f"{batch / rtt:.2f}x one round trip (target < 2x)",
                )
            )
            for invocations in (int(n) for n in args.invocations.split(",")):
                ideal = args.latency_ms / 1000 * args.registrations / (invocations * args.per_invocation)
                elapsed, cpu, failed = throughput(fn, arn, args.registrations, invocations)
                failures += failed
                rows.append(
                    (
                        f"{args.registrations} registrations, {invocations} invocation(s) x "
                        f"{args.per_invocation} in flight, {label}",
                        f"{elapsed:.2f} s ({args.registrations / elapsed:.0f}/s), {failed} failed, "
                        f"handler CPU {cpu / args.registrations * 1000:.2f} ms/registration",
                        f"{ideal / elapsed:.2f} of ideal {ideal:.2f} s (target >= 0.7)",
                    )
                )
        counters = emulator.counters()
        memory = peak_memory_mb(stack)

    rows += [
        (
            "upstream users created / Create calls",
            f"{counters['users_total']} / {counters['creates']}",
            "one Create per user",
        ),
        ("peak memory, one invocation (max RSS of a fresh process)", f"{memory:.0f} MB", "target < 128 MB"),
    ]
    table = "\n".join(
        ["| measure | result | ratio / target |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    )
    report = (
        f"# Registration benchmark\n\n{stamp()} on {machine()}; upstream latency {args.latency_ms} ms "
        f"(emulator), moto server in its own process.\n\n{table}\n"
    )
    print(report)
    out = REPO_ROOT / "bench" / "results" / "registration.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
