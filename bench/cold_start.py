"""Cold starts of the built artifact, as ratios to a bare ``import boto3`` + one client, in one run.

Each probe is a fresh interpreter of the runtime's Python holding nothing but boto3 (``.venv-runtime``), run on a
read-only copy of ``.aws-sam/build`` with ``PYTHONDONTWRITEBYTECODE=1`` (Lambda's code folders are read-only, so
only the bytecode the build shipped can spare a cold start the compiling). Every function of the template is
measured. Per round (a fresh stack and emulator each), in a shuffled order:

- the baseline: ``import boto3`` and ``boto3.client("sqs")``;
- each function: the import of its handler's module, its first invocation's set-up (``warm()``: settings, boto3
  clients, the services and models of its path), its first invocation (the credentials secret read, the first
  upstream and DynamoDB calls) and a second, warm one, against moto and the User Service emulator. The refresh
  worker and the lifecycle function act on the users the round's queue batches registered, so they run after the
  others, in a shuffled order, with a baseline of their own taken right after them.

Imports are timed again on their own, many times, baseline and handlers interleaved (``--imports``): on a shared
machine a single wall-clock timing can be off by 2x either way, so the report gives, per function, the ratio of
the median CPU times (an import from local bytecode is CPU-bound, and CPU time hardly moves with the machine's
load: the target is judged on it), the ratio of the fastest wall times and the median of the paired wall ratios.

Memory and the time of a realistic batch are measured by ``bench/memory.py``.

Run with ``make cold-start`` (it builds first); ``ARGS="--imports 25"`` for more timings, ``--from-json`` to
summarise the raw reports of an earlier ``--json`` run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from artifact_workloads import (
    BATCH,
    DUE_MARGIN,
    Round,
    failures,
    fresh_round,
    lifecycle_batch,
    read_only_copy,
    registration_batch,
    scheduled_event,
    signup_event,
    sqs_event,
)
from common import REPO_ROOT, moto_server

from local.artifact import BuiltArtifact, baseline

TARGET_RATIO = 1.5
#: Every function of the template, in its order there.
FUNCTIONS = (
    "SignupFunction",
    "RegistrationQueueFunction",
    "LifecycleFunction",
    "RefreshSweeperFunction",
    "RefreshWorkerFunction",
    "ReconcileFunction",
)
#: Those that act on the users a round's queue batches registered: run after the others.
LATE = ("RefreshWorkerFunction", "LifecycleFunction")


def stored_jobs(world: Round, prefix: str) -> list[dict[str, Any]]:
    """Refresh jobs for the users a queue batch registered under ``prefix`` (as the sweeper would queue them)."""
    dynamodb = world.client("dynamodb")
    table = world.stack.physical["TokensTable"]
    items = [item for page in dynamodb.get_paginator("scan").paginate(TableName=table) for item in page["Items"]]
    jobs = [
        {"DeviceToken": item["DeviceToken"]["S"], "Version": int(item["Version"]["N"])}
        for item in items
        if item.get("ClientId", {}).get("S", "").startswith(f"{prefix}-") and "RefreshToken" in item
    ]
    if len(jobs) != BATCH:
        raise RuntimeError(f"expected {BATCH} users registered as {prefix}-*, found {len(jobs)}")
    return jobs


def measure(args: argparse.Namespace) -> dict[str, Any]:
    artifact = BuiltArtifact(args.build_dir)
    with moto_server() as endpoint, read_only_copy(artifact) as built:
        rounds = []
        for number in range(args.rounds):
            with fresh_round(endpoint, number, "cold") as world:
                rounds.append(run_round(number, args, built, world))
        with fresh_round(endpoint, args.rounds, "cold") as world:
            imports = time_imports(args, built, world)
        return {"rounds": rounds, "imports": imports, "load": os.getloadavg()}


def run_round(number: int, args: argparse.Namespace, built: BuiltArtifact, world: Round) -> dict[str, Any]:
    tag = world.tag
    plans: dict[str, tuple[list[dict[str, Any]], dict[str, str]]] = {
        "SignupFunction": ([signup_event(f"{tag}-signup-a"), signup_event(f"{tag}-signup-b")], {}),
        "RegistrationQueueFunction": (
            [registration_batch(world, f"{tag}-q1"), registration_batch(world, f"{tag}-q2")],
            {},
        ),
        "RefreshSweeperFunction": ([scheduled_event("refresh-sweep.json")] * 2, {}),
        "ReconcileFunction": ([scheduled_event("reconcile.json")] * 2, {}),
    }
    results: dict[str, Any] = {}

    def run(names: Iterable[str]) -> None:
        for name in names:
            if name in ("baseline", "late baseline"):
                results[name] = baseline(args.runtime_python, built.environment("SignupFunction", world.stack))
                continue
            events, overrides = plans[name]
            results[name] = built.run(
                name, runtime_python=args.runtime_python, stack=world.stack, events=events, overrides=overrides
            )
            failures(name, results[name])

    early = ["baseline", *plans]
    random.shuffle(early)
    run(early)
    # The worker refreshes the users of the queue's two batches (due, with a margin above the tokens' lifetime);
    # the lifecycle function updates their profiles.
    refresh_arn = world.stack.queue_arn("RefreshQueue")
    plans["RefreshWorkerFunction"] = (
        [sqs_event(stored_jobs(world, f"{tag}-q{n}"), refresh_arn) for n in (1, 2)],
        DUE_MARGIN,
    )
    plans["LifecycleFunction"] = ([lifecycle_batch(world, f"{tag}-q{n}") for n in (1, 2)], {})
    late = list(LATE)
    random.shuffle(late)
    run([*late, "late baseline"])
    print(
        f"round {number + 1}/{args.rounds}: baseline {results['baseline']['import_ms']:.0f} ms; "
        + ", ".join(f"{name} {results[name]['import_ms']:.0f} ms" for name in FUNCTIONS),
        flush=True,
    )
    return results


def time_imports(args: argparse.Namespace, built: BuiltArtifact, world: Round) -> dict[str, Any]:
    """``--imports`` repetitions of: the baseline, then each handler's import alone, in a shuffled order."""
    base_env = built.environment("SignupFunction", world.stack)
    timings: dict[str, list[tuple[float, float]]] = {"baseline": [], **{name: [] for name in FUNCTIONS}}
    for _ in range(args.imports):
        names = list(timings)
        random.shuffle(names)
        for name in names:
            if name == "baseline":
                report = baseline(args.runtime_python, base_env)
            else:
                report = built.run(name, runtime_python=args.runtime_python, stack=world.stack, setup=False)
            timings[name].append((report["import_ms"], report["import_cpu_ms"]))
    print(f"imports timed {args.imports} times each", flush=True)
    return timings


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def summarise(measured: dict[str, Any]) -> tuple[str, bool]:
    rounds: list[dict[str, Any]] = measured["rounds"]
    imports: dict[str, list[tuple[float, float]]] = measured["imports"]
    baseline_ms = [r["baseline"]["import_ms"] for r in rounds]
    baseline_cpu = [r["baseline"]["import_cpu_ms"] for r in rounds]
    python = ".".join(map(str, rounds[0]["baseline"]["python"]))
    load = ", ".join(f"{v:.1f}" for v in measured["load"])
    lines = [
        "# Cold starts of the built artifact",
        "",
        f"`make cold-start` on {time.strftime('%Y-%m-%d')}, {platform.platform()}: {len(rounds)} rounds, "
        f"Python {python} ({platform.machine()}, {os.cpu_count()} CPUs shared with other work: compare ratios, not "
        "milliseconds).",
        "Each figure comes from a fresh interpreter holding only boto3, on a read-only copy of `.aws-sam/build`,",
        "with `PYTHONDONTWRITEBYTECODE=1`. A round (its own stack and emulator) times the baseline and each function",
        "in a shuffled order; a ratio is the function's figure over the same round's baseline (the refresh worker and",
        "the lifecycle function, which act on the users the round's queue batches registered, run last and are",
        "compared with a baseline taken right after them).",
        "",
        f"Baseline, `import boto3` + `boto3.client('sqs')`: median {_median(baseline_ms):.0f} ms wall "
        f"(min {min(baseline_ms):.0f}, max {max(baseline_ms):.0f}), {_median(baseline_cpu):.0f} ms CPU.",
        "",
        f"Target: the handler's import at most {TARGET_RATIO}x the baseline.",
        "",
        f"### Imports, timed {len(imports['baseline'])} times each (baseline and handlers interleaved)",
        "",
        f"Load average at the end of the run: {load} on {os.cpu_count()} CPUs. Fastest baseline: "
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
        f"### First invocations, {len(rounds)} rounds (medians)",
        "",
        "| function | import / baseline (median, worst) | set-up ms (its CPU ms) "
        "| import + set-up CPU / baseline CPU | 1st invocation ms | import + set-up + 1st / baseline |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in FUNCTIONS:
        base = "late baseline" if name in LATE else "baseline"
        ratios = [r[name]["import_ms"] / r[base]["import_ms"] for r in rounds]
        cpu_ratios = [(r[name]["import_cpu_ms"] + r[name]["setup_cpu_ms"]) / r[base]["import_cpu_ms"] for r in rounds]
        totals = [
            (r[name]["import_ms"] + r[name]["setup_ms"] + r[name]["invocations"][0]["ms"]) / r[base]["import_ms"]
            for r in rounds
        ]
        lines.append(
            f"| {name} | {_median(ratios):.2f}, {max(ratios):.2f} "
            f"| {_median(r[name]['setup_ms'] for r in rounds):.0f} "
            f"({_median(r[name]['setup_cpu_ms'] for r in rounds):.0f}) | {_median(cpu_ratios):.2f} "
            f"| {_median(r[name]['invocations'][0]['ms'] for r in rounds):.0f} | {_median(totals):.2f} |"
        )
    lines += [
        "",
        "The set-up is what a function builds once per container before its first invocation's work (its settings,",
        "boto3 clients, services, the pydantic models and modules of its path): the lifecycle and reconcile",
        "functions import boto3 there, not in their handler's import. The 1st invocation then reads the secrets it",
        "needs (instance credentials; the admin session's, for lifecycle and reconcile) and does its work against",
        "moto and the emulator (no added latency): signup registers one user, the queue function a batch of 10, the",
        "sweeper sweeps every shard, the worker refreshes 10 users, the lifecycle function applies 10 profile",
        "updates, the reconcile function checks for lost bulk chunks and audits the round's table against the",
        "upstream. Memory and the time of realistic batches: `bench/results/memory.md`.",
        "",
        f"Result: {'every' if passed else 'NOT every'} handler's import at or under {TARGET_RATIO}x the baseline "
        "(median CPU time of the import over that of the baseline).",
    ]
    return "\n".join(lines) + "\n", passed


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--build-dir",
        type=Path,
        default=Path(os.environ.get("TELEMATICS_BUILD_DIR", REPO_ROOT / ".aws-sam" / "build")),
    )
    parser.add_argument(
        "--runtime-python",
        type=Path,
        default=Path(os.environ.get("TELEMATICS_RUNTIME_PYTHON", REPO_ROOT / ".venv-runtime" / "bin" / "python")),
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of first invocations")
    parser.add_argument("--imports", type=int, default=15, help="timings of each import")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "cold_start.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw reports here")
    parser.add_argument("--from-json", type=Path, default=None, help="summarise raw reports written by --json")
    args = parser.parse_args()
    measured = json.loads(args.from_json.read_text(encoding="utf-8")) if args.from_json else measure(args)
    if args.json:
        raw = [{k: {f: v for f, v in rep.items() if f != "stdout"} for k, rep in r.items()} for r in measured["rounds"]]
        dump = {"rounds": raw, "imports": measured["imports"], "load": measured["load"]}
        args.json.write_text(json.dumps(dump, indent=1, default=str), encoding="utf-8")
    report, passed = summarise(measured)
    args.output.write_text(report, encoding="utf-8")
    print(report)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
