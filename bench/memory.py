"""Memory and time per batch of every function of the built artifact, to choose each function's ``MemorySize``.

Each function runs as Lambda runs it (``local/artifact.py``): a fresh interpreter of the runtime's Python holding
nothing but boto3, on a read-only copy of ``.aws-sam/build``, ``PYTHONDONTWRITEBYTECODE=1``, its environment from
the template, against moto (its own process) and the User Service emulator. Per round (a fresh stack and emulator),
in this order, one container (process) per line:

==========================  ==========================================================================
signup                      2 ``UserSignedUp`` events (a new user each)
queue, batch of 10          2 SQS batches of 10 new users each (the template's BatchSize)
queue, bulk of 100          2 messages asking for 100 anonymous users (one CreateMany call each)
queue, bulk of ``--users``  1 message asking for ``--users`` users (the population the sweep then finds)
sweeper                     1 sweep with every stored user due (a margin above the tokens' lifetime)
refresh worker              2 batches of 10 jobs the sweep queued
lifecycle                   2 batches of 10 profile updates of the users of the queue's batches
reconcile                   1 wake-up: adoption check, then the drift audit of every stored user
                            (``GetFilteredPage`` pages of 1,000)
==========================  ==========================================================================

Reported per line: the process's peak resident memory (``VmHWM``: interpreter, libraries, set-up and the work;
what Lambda reports as "Max Memory Used", less its runtime client), the peak after the set-up alone, and the wall
and CPU time of the batch (the second, warm one where there are two). Lambda gives a function ``MemorySize / 1769``
of a vCPU: the CPU time here (at the full speed of one core) tells what a smaller size stretches.

    make memory                       # 3 rounds, 1,000 users swept and audited
    make memory ARGS="--users 5000"

Writes ``bench/results/memory.md`` (the reasoning for each MemorySize is written there by hand, below the table
this script regenerates between its markers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifact_workloads import (
    DUE_MARGIN,
    Round,
    bulk_message,
    failures,
    fresh_round,
    lifecycle_batch,
    read_only_copy,
    refresh_batches,
    registration_batch,
    scheduled_event,
    signup_event,
)
from common import REPO_ROOT, moto_server

from local.artifact import BuiltArtifact

RESULTS = REPO_ROOT / "bench" / "results" / "memory.md"
BEGIN, END = "<!-- memory.py: begin -->", "<!-- memory.py: end -->"
#: MB of memory that make one vCPU on Lambda.
FULL_VCPU_MB = 1769


@dataclass
class Workload:
    label: str
    function: str
    events: list[dict[str, Any]]
    overrides: dict[str, str] = field(default_factory=dict)
    what: str = ""


def workloads_before_sweep(world: Round, users: int) -> list[Workload]:
    tag = world.tag
    return [
        Workload(
            "signup",
            "SignupFunction",
            [signup_event(f"{tag}-signup-a"), signup_event(f"{tag}-signup-b")],
            what="one user",
        ),
        Workload(
            "queue, batch of 10",
            "RegistrationQueueFunction",
            [registration_batch(world, f"{tag}-q1"), registration_batch(world, f"{tag}-q2")],
            what="10 users",
        ),
        Workload(
            "queue, bulk of 100",
            "RegistrationQueueFunction",
            [bulk_message(world, 100), bulk_message(world, 100)],
            what="100 users, one CreateMany",
        ),
        Workload(
            f"queue, bulk of {users:,}",
            "RegistrationQueueFunction",
            [bulk_message(world, users)],
            what=f"{users:,} users, {(users + 99) // 100} CreateMany",
        ),
        Workload(
            "sweeper",
            "RefreshSweeperFunction",
            [scheduled_event("refresh-sweep.json")],
            DUE_MARGIN | {"REFRESH_SPREAD_SECONDS": "0"},
        ),
    ]


def workloads_after_sweep(world: Round) -> list[Workload]:
    tag = world.tag
    return [
        Workload("refresh worker", "RefreshWorkerFunction", refresh_batches(world, 2), DUE_MARGIN, "10 refreshes"),
        Workload(
            "lifecycle",
            "LifecycleFunction",
            [lifecycle_batch(world, f"{tag}-q1"), lifecycle_batch(world, f"{tag}-q2")],
            what="10 profile updates",
        ),
        Workload("reconcile", "ReconcileFunction", [scheduled_event("reconcile.json")]),
    ]


def run_workload(built: BuiltArtifact, runtime: Path, world: Round, workload: Workload) -> dict[str, Any]:
    report = built.run(
        workload.function,
        runtime_python=runtime,
        stack=world.stack,
        events=workload.events,
        overrides=workload.overrides,
        timeout=600,
    )
    failures(workload.label, report)
    batch = report["invocations"][-1]
    result = batch["result"]
    return {
        "label": workload.label,
        "function": workload.function,
        "what": workload.what or describe(workload.function, result),
        "peak_mb": report["max_rss_mb"],
        "setup_peak_mb": report["setup_peak_mb"],
        "ms": batch["ms"],
        "cpu_ms": batch["cpu_ms"],
        "invocations": len(report["invocations"]),
    }


def describe(function: str, result: Any) -> str:
    """What a sweep or a reconcile wake-up did, from its result."""
    if function == "RefreshSweeperFunction":
        return f"{result['users_due']:,} users due, {result['queued']:,} jobs queued"
    if function == "ReconcileFunction":
        audit = result.get("Audit") or {}
        report = audit.get("Report") or {}
        return (
            f"audit {audit.get('Status', '?')}: {report.get('Pages', '?')} pages, "
            f"{report.get('UpstreamUsers', '?')} upstream users, {report.get('Audited', '?')} audited"
        )
    return ""


def measure(args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    artifact = BuiltArtifact(args.build_dir)
    rounds: list[list[dict[str, Any]]] = []
    with moto_server() as endpoint, read_only_copy(artifact) as built:
        for number in range(args.rounds):
            with fresh_round(endpoint, number, "memory") as world:
                results = [
                    run_workload(built, args.runtime_python, world, w)
                    for w in workloads_before_sweep(world, args.users)
                ]
                results += [run_workload(built, args.runtime_python, world, w) for w in workloads_after_sweep(world)]
            rounds.append(results)
            print(
                f"round {number + 1}/{args.rounds}: "
                + ", ".join(f"{r['label']} {r['peak_mb']:.0f} MB {r['ms']:.0f} ms" for r in results),
                flush=True,
            )
    return rounds


def memory_sizes(build_dir: Path) -> dict[str, int]:
    return {name: function.memory for name, function in BuiltArtifact(build_dir).functions.items()}


def estimate_ms(wall_ms: float, cpu_ms: float, memory_mb: int) -> float:
    """The batch's time at ``memory_mb``: its CPU time stretched to the vCPU share, the waiting unchanged."""
    waiting = max(0.0, wall_ms - cpu_ms)
    return waiting + cpu_ms * max(1.0, FULL_VCPU_MB / memory_mb)


def table(rounds: list[list[dict[str, Any]]], sizes: dict[str, int], args: argparse.Namespace) -> str:
    def med(label: str, key: str) -> float:
        return float(statistics.median(r[key] for results in rounds for r in results if r["label"] == label))

    def worst(label: str, key: str) -> float:
        return max(r[key] for results in rounds for r in results if r["label"] == label)

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        BEGIN,
        f"`make memory` on {time.strftime('%Y-%m-%d')}, {platform.platform()}, {os.cpu_count()} CPUs shared with "
        f"other work (load average {load} at the end), the runtime's Python {platform.python_version()}: "
        f"{len(rounds)} rounds, `--users {args.users}`.",
        "",
        "| function | batch | peak RSS MB (worst) | after set-up MB | batch ms (median) | its CPU ms "
        "| MemorySize | batch ms at MemorySize (est.) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in rounds[0]:
        label, function = result["label"], result["function"]
        wall, cpu = med(label, "ms"), med(label, "cpu_ms")
        size = sizes[function]
        lines.append(
            f"| {function} | {label}: {result['what']} | {worst(label, 'peak_mb'):.0f} "
            f"| {worst(label, 'setup_peak_mb'):.0f} | {wall:.0f} | {cpu:.0f} | {size} "
            f"| {estimate_ms(wall, cpu, size):.0f} |"
        )
    lines += [
        "",
        "Peak RSS is the process's `VmHWM` after the set-up and every invocation of its line. The batch is the",
        "second (warm) invocation where a line has two. The estimate stretches the batch's CPU time to the",
        f"MemorySize's share of a vCPU (MemorySize / {FULL_VCPU_MB}) and keeps the rest (waiting on moto and the",
        "emulator, here on loopback without added latency) as it is.",
        END,
    ]
    return "\n".join(lines)


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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=1000, help="users of the big bulk, swept and audited")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument("--from-json", type=Path, default=None, help="tabulate the raw figures of an earlier run")
    args = parser.parse_args()
    rounds = json.loads(args.from_json.read_text(encoding="utf-8")) if args.from_json else measure(args)
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=1), encoding="utf-8")
    generated = table(rounds, memory_sizes(args.build_dir), args)
    print(generated)
    existing = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
    if BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        document = head + generated + rest.split(END, 1)[1]
    else:
        document = f"# Memory and time per batch of the built functions\n\n{generated}\n"
    args.output.write_text(document, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
