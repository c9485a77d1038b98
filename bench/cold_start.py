"""Cold starts of the built artifact, as ratios to a bare ``import boto3`` + one client, in one run.

Each probe is a fresh interpreter of the runtime's Python holding nothing but boto3 (``.venv-runtime``), run on a
read-only copy of ``.aws-sam/build`` with ``PYTHONDONTWRITEBYTECODE=1`` (Lambda's code folders are read-only, so
only the bytecode the build shipped can spare a cold start the compiling). Per round, in a shuffled order:

- the baseline: ``import boto3`` and ``boto3.client("sqs")``;
- each function: the import of its handler's module, its first invocation (settings, clients, the secret read,
  the first upstream and DynamoDB calls) and a second, warm invocation, against moto and the User Service emulator.

Imports are timed again on their own, many times, baseline and handlers interleaved (``--imports``): on a shared
machine a single wall-clock timing can be off by 2x either way, so the report gives, per function, the ratio of
the median CPU times (an import from local bytecode is CPU-bound, and CPU time hardly moves with the machine's
load: the target is judged on it), the ratio of the fastest wall times and the median of the paired wall ratios.
The rounds give the first invocation's set-up and times, the CPU time of a batch (what MemorySize buys) and the
peak RSS (what MemorySize must hold).

Run with ``make cold-start`` (it builds first); ``ARGS="--imports 25"`` for more timings, ``--from-json`` to
summarise the raw reports of an earlier ``--json`` run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import stat
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "layers" / "telematics")]

from local import moto_server  # noqa: E402
from local.artifact import BuiltArtifact, baseline  # noqa: E402
from local.emulator.testing import running_emulator  # noqa: E402
from local.stack import LocalStack, provision  # noqa: E402

INSTANCES = {"default": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())}}
TARGET_RATIO = 1.5
BATCH = 10


def sqs_event(bodies: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": f"handle-{n}",
                "body": json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": str(int(time.time() * 1000))},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            }
            for n, body in enumerate(bodies)
        ]
    }


def signup_event(client_id: str) -> dict[str, Any]:
    sample: dict[str, Any] = json.loads((ROOT / "events" / "signup.json").read_text(encoding="utf-8"))
    sample["id"] = str(uuid.uuid4())
    sample["detail"]["ClientId"] = client_id
    return sample


def registrations(prefix: str) -> list[dict[str, Any]]:
    return [{"ClientId": f"{prefix}-{n}", "Email": f"{prefix}-{n}@example.com"} for n in range(BATCH)]


@contextmanager
def read_only_copy(artifact: BuiltArtifact) -> Iterator[BuiltArtifact]:
    scratch = Path(tempfile.mkdtemp(prefix="cold-start-"))
    try:
        yield artifact.read_only_copy(scratch / "build")
    finally:
        for folder, _dirs, _files in os.walk(scratch):
            Path(folder).chmod(stat.S_IRWXU)
        shutil.rmtree(scratch)


def refresh_jobs(stack: LocalStack, client_prefix: str) -> list[dict[str, Any]]:
    """Jobs for the users a round's queue batch registered (as the sweeper would queue them)."""
    dynamodb = boto3.client("dynamodb", endpoint_url=stack.endpoint_url, region_name=stack.region)
    table = stack.physical["TokensTable"]
    items = [item for page in dynamodb.get_paginator("scan").paginate(TableName=table) for item in page["Items"]]
    jobs = [
        {"DeviceToken": item["DeviceToken"]["S"], "Version": int(item["Version"]["N"])}
        for item in items
        if item.get("ClientId", {}).get("S", "").startswith(f"{client_prefix}-") and "DeviceToken" in item
    ]
    if len(jobs) != BATCH:
        raise RuntimeError(f"expected {BATCH} users registered as {client_prefix}-*, found {len(jobs)}")
    return jobs


def measure(args: argparse.Namespace) -> dict[str, Any]:
    artifact = BuiltArtifact(args.build_dir)
    runtime = args.runtime_python
    server = moto_server.start()
    try:
        with (
            running_emulator(instances=INSTANCES, token_lifetime=3600) as upstream,
            read_only_copy(artifact) as built,
        ):
            os.environ.update(
                {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
            )
            stack = provision(
                moto_server.endpoint(server),
                template_path=ROOT / "template.yaml",
                parameters={"UserServiceUrl": upstream.url},
                stack_name="cold-start",
                instance_credentials=INSTANCES,
            )
            rounds = [run_round(number, args, built, runtime, stack) for number in range(args.rounds)]
            imports = time_imports(args, built, runtime, stack)
            return {"rounds": rounds, "imports": imports, "functions": built.functions, "load": os.getloadavg()}
    finally:
        server.stop()


def run_round(number: int, args: argparse.Namespace, built: BuiltArtifact, runtime: Path, stack: LocalStack) -> Any:
    tag = f"r{number}-{uuid.uuid4().hex[:6]}"
    registration_arn = stack.queue_arn("RegistrationQueue")
    sweep = json.loads((ROOT / "events" / "refresh-sweep.json").read_text(encoding="utf-8"))
    plans: dict[str, list[dict[str, Any]]] = {
        "SignupFunction": [signup_event(f"{tag}-signup-a"), signup_event(f"{tag}-signup-b")],
        "RegistrationQueueFunction": [
            sqs_event(registrations(f"{tag}-q1"), registration_arn),
            sqs_event(registrations(f"{tag}-q2"), registration_arn),
        ],
        "RefreshSweeperFunction": [sweep, sweep],
    }
    order = ["baseline", *plans]
    random.shuffle(order)
    base_env = built.environment("SignupFunction", stack)
    results: dict[str, Any] = {}
    for name in order:
        if name == "baseline":
            results[name] = baseline(runtime, base_env)
        else:
            results[name] = built.run(name, runtime_python=runtime, stack=stack, events=plans[name])
    # The worker refreshes the ten users this round's first queue batch registered (so it runs after it), with a
    # margin above the tokens' lifetime so that they are due; its own baseline is taken right after it.
    jobs = refresh_jobs(stack, f"{tag}-q1")
    refresh_arn = stack.queue_arn("RefreshQueue")
    results["RefreshWorkerFunction"] = built.run(
        "RefreshWorkerFunction",
        runtime_python=runtime,
        stack=stack,
        events=[sqs_event(jobs[:5], refresh_arn), sqs_event(jobs[5:], refresh_arn)],
        overrides={"REFRESH_MARGIN_SECONDS": "7200"},
    )
    results["RefreshWorkerBaseline"] = baseline(runtime, base_env)
    for name, report in results.items():
        for invocation in report.get("invocations", []):
            if "error" in invocation:
                raise RuntimeError(f"{name} failed: {invocation['error']}")
    print(
        f"round {number + 1}/{args.rounds}: baseline {results['baseline']['import_ms']:.0f} ms; "
        + ", ".join(f"{name} {results[name]['import_ms']:.0f} ms" for name in FUNCTIONS),
        flush=True,
    )
    return results


FUNCTIONS = ("SignupFunction", "RegistrationQueueFunction", "RefreshSweeperFunction", "RefreshWorkerFunction")


def time_imports(args: argparse.Namespace, built: BuiltArtifact, runtime: Path, stack: LocalStack) -> dict[str, Any]:
    """``--imports`` repetitions of: the baseline, then each handler's import alone, in a shuffled order."""
    base_env = built.environment("SignupFunction", stack)
    timings: dict[str, list[tuple[float, float]]] = {"baseline": [], **{name: [] for name in FUNCTIONS}}
    for _ in range(args.imports):
        names = list(timings)
        random.shuffle(names)
        for name in names:
            if name == "baseline":
                report = baseline(runtime, base_env)
            else:
                report = built.run(name, runtime_python=runtime, stack=stack, setup=False)
            timings[name].append((report["import_ms"], report["import_cpu_ms"]))
    print(f"imports timed {args.imports} times each", flush=True)
    return timings


def _median(values: Iterator[float] | list[float]) -> float:
    return float(statistics.median(list(values)))


def summarise(measured: dict[str, Any]) -> tuple[str, bool]:
    rounds: list[dict[str, Any]] = measured["rounds"]
    imports: dict[str, list[tuple[float, float]]] = measured["imports"]
    functions = measured["functions"]
    baseline_ms = [r["baseline"]["import_ms"] for r in rounds]
    baseline_cpu = [r["baseline"]["import_cpu_ms"] for r in rounds]
    python = ".".join(map(str, rounds[0]["baseline"]["python"]))
    lines = [
        "# Cold starts of the built artifact",
        "",
        f"`make cold-start` on {time.strftime('%Y-%m-%d')}: {len(rounds)} rounds, Python {python} "
        f"({platform.machine()}, {os.cpu_count()} CPUs shared with other work: compare ratios, not milliseconds).",
        "Each figure comes from a fresh interpreter holding only boto3, on a read-only copy of `.aws-sam/build`,",
        "with `PYTHONDONTWRITEBYTECODE=1`. A round times the baseline and each function in a shuffled order; a",
        "ratio is the function's figure over the same round's baseline (the refresh worker, which needs the users",
        "its round registered, runs last and is compared with a baseline taken right after it).",
        "",
        f"Baseline, `import boto3` + `boto3.client('sqs')`: median {_median(baseline_ms):.0f} ms wall "
        f"(min {min(baseline_ms):.0f}, max {max(baseline_ms):.0f}), {_median(baseline_cpu):.0f} ms CPU.",
        "",
        f"Target: the handler's import at most {TARGET_RATIO}x the baseline.",
        "",
        f"### Imports, timed {len(imports['baseline'])} times each (baseline and handlers interleaved)",
        "",
        f"Load average during the run: {', '.join(f'{v:.1f}' for v in measured['load'])} on {os.cpu_count()} CPUs. "
        "Fastest baseline: "
        f"{min(w for w, _ in imports['baseline']):.0f} ms wall, {min(c for _, c in imports['baseline']):.0f} ms CPU.",
        "",
        "| function | fastest import ms | fastest / fastest baseline | median of paired ratios "
        "| CPU / baseline CPU (medians) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    passed = True
    base_wall = [w for w, _ in imports["baseline"]]
    base_cpu = [c for _, c in imports["baseline"]]
    for name in FUNCTIONS:
        wall = [w for w, _ in imports[name]]
        cpu = [c for _, c in imports[name]]
        fastest = min(wall) / min(base_wall)
        paired = [w / b for w, b in zip(wall, base_wall, strict=True)]
        cpu_ratio = _median(cpu) / _median(base_cpu)
        passed &= cpu_ratio <= TARGET_RATIO
        lines.append(f"| {name} | {min(wall):.0f} | {fastest:.2f} | {_median(paired):.2f} | **{cpu_ratio:.2f}** |")
    lines += [
        "",
        f"### First invocations, {len(rounds)} rounds",
        "",
        "| function | import / baseline (median, worst) | set-up ms | 1st invocation ms "
        "| import + set-up + 1st / baseline |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in FUNCTIONS:
        base = "RefreshWorkerBaseline" if name == "RefreshWorkerFunction" else "baseline"
        ratios = [r[name]["import_ms"] / r[base]["import_ms"] for r in rounds]
        totals = [
            (r[name]["import_ms"] + r[name]["setup_ms"] + r[name]["invocations"][0]["ms"]) / r[base]["import_ms"]
            for r in rounds
        ]
        lines.append(
            f"| {name} | {_median(ratios):.2f}, {max(ratios):.2f} "
            f"| {_median(r[name]['setup_ms'] for r in rounds):.0f} "
            f"| {_median(r[name]['invocations'][0]['ms'] for r in rounds):.0f} | {_median(totals):.2f} |"
        )
    lines += [
        "",
        "Set-up is what a function builds once per container on its first invocation (settings, boto3 clients,",
        "the modules of its path); the 1st invocation then reads the credentials secret (signup, queue, worker)",
        "and does its work against moto and the emulator (no added latency).",
        "",
        "## Memory and time per batch",
        "",
        "| function | max RSS MB (worst round) | warm invocation ms | its CPU ms | MemorySize |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in FUNCTIONS:
        warm = [r[name]["invocations"][1] for r in rounds]
        lines.append(
            f"| {name} | {max(r[name]['max_rss_mb'] for r in rounds):.0f} | {_median(i['ms'] for i in warm):.0f} "
            f"| {_median(i['cpu_ms'] for i in warm):.0f} | {functions[name].memory} |"
        )
    lines += [
        "",
        "The warm invocation: signup registers one new user; the queue function a batch of 10 new users (records",
        "concurrently); the sweeper sweeps every shard; the refresh worker refreshes a batch of 5 users. CPU ms",
        "is user + system time at the full speed of one core here; Lambda gives MemorySize / 1769 of a vCPU.",
        "",
        f"Result: {'every' if passed else 'NOT every'} handler's import at or under {TARGET_RATIO}x the baseline "
        "(median CPU time of the import over that of the baseline).",
    ]
    return "\n".join(lines) + "\n", passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--build-dir", type=Path, default=Path(os.environ.get("TELEMATICS_BUILD_DIR", ROOT / ".aws-sam" / "build"))
    )
    parser.add_argument(
        "--runtime-python",
        type=Path,
        default=Path(os.environ.get("TELEMATICS_RUNTIME_PYTHON", ROOT / ".venv-runtime" / "bin" / "python")),
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of first invocations")
    parser.add_argument("--imports", type=int, default=15, help="timings of each import")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "cold_start.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw reports here")
    parser.add_argument("--from-json", type=Path, default=None, help="summarise raw reports written by --json")
    args = parser.parse_args()
    if args.from_json:
        measured = json.loads(args.from_json.read_text(encoding="utf-8"))
        measured["functions"] = BuiltArtifact(args.build_dir).functions
    else:
        measured = measure(args)
    report, passed = summarise(measured)
    args.output.write_text(report, encoding="utf-8")
    if args.json:
        raw = [{k: {f: v for f, v in rep.items() if f != "stdout"} for k, rep in r.items()} for r in measured["rounds"]]
        dump = {"rounds": raw, "imports": measured["imports"], "load": measured["load"]}
        args.json.write_text(json.dumps(dump, indent=1, default=str), encoding="utf-8")
    print(report)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
