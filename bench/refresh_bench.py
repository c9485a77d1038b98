"""Token maintenance benchmark: what a sweep reads, and how fast the refresh workers go.

Usage (from the repository root)::

    .venv/bin/python bench/refresh_bench.py
    .venv/bin/python bench/refresh_bench.py --users 20000 --due-fraction 0.01 --refresh-users 300 --latency-ms 50

Measures, in one run (moto server in its own process, the template's resources provisioned in it):

1. **Sweep cost.** ``--users`` users written straight into the tokens table (``DynamoTokenStore.put_new_users``,
   fake tokens), ``--due-fraction`` of them expiring within the margin, the rest far away. One sweep through
   :class:`Sweeper` with an in-memory (counting) job queue. Reported: items the sweep read (its own count, and
   the ``ScannedCount`` of every DynamoDB Query it made, summed by a botocore hook) divided by the users due.
   Target: at most 1.2; a Scan would read every user (``1 / due-fraction``, 100 at 1 %). Also how long it took.
2. **Refresh throughput.** ``--refresh-users`` users created in the emulator (CreateMany) and stored, all due; the
   emulator then answers after ``--latency-ms``. ``--workers`` worker containers (each a :class:`TokenRefresher`
   built by the worker function's wiring from its environment, on DynamoDB in moto) take the sweep's jobs in SQS
   batches of 10 through the worker handler, ``--concurrency`` (UPSTREAM_CONCURRENCY) records at once. Reported:
   refreshes per second against the ideal ``workers x concurrency / latency``.

Results are printed as a markdown table and written to ``bench/results/refresh.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.config import Config
from common import REPO_ROOT, moto_server

sys.path.insert(0, str(REPO_ROOT / "functions" / "refresh_worker"))

from handle_refresh_jobs import handle_refresh_batch

from local.emulator.testing import EmulatorHandle, running_emulator
from local.fake_store import InMemoryTokenStore
from local.fakes import InMemoryRefreshJobQueue, RecordingPublisher
from local.lambda_runtime import environment
from local.stack import LocalStack, provision
from telematics_reg.credentials import StaticCredentials
from telematics_reg.models import CreateManyRequest, InstanceCredentials, build_models
from telematics_reg.refresh import RefreshJob, Sweeper, TokenRefresher
from telematics_reg.registration import tokens_of
from telematics_reg.settings import ServiceSettings
from telematics_reg.store import DynamoTokenStore, NewUser, Tokens, TokenStore
from telematics_reg.upstream import UserServiceClient
from telematics_reg.wiring import build_refresher

INSTANCES = {"default": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())}}
MARGIN = 900
RESULTS = REPO_ROOT / "bench" / "results" / "refresh.md"


def dynamodb_client(pool: int = 20) -> Any:
    return boto3.client("dynamodb", config=Config(max_pool_connections=pool, retries={"mode": "standard"}))


class QueryMeter:
    """Sums what DynamoDB reports for every Query of a client (``Count`` and ``ScannedCount``)."""

    def __init__(self, client: Any) -> None:
        self.calls = 0
        self.scanned = 0
        self.returned = 0
        self._lock = threading.Lock()
        client.meta.events.register("after-call.dynamodb.Query", self._after_call)

    def _after_call(self, parsed: dict[str, Any], **_: Any) -> None:
        with self._lock:
            self.calls += 1
            self.scanned += int(parsed.get("ScannedCount", parsed.get("Count", 0)))
            self.returned += int(parsed.get("Count", 0))


def fake_tokens(expires_at: int) -> Tokens:
    return Tokens(access_token=f"fake.{uuid.uuid4().hex}.jwt", refresh_token=uuid.uuid4().hex, expires_at=expires_at)


# ------------------------------------------------------------------------------------------------ sweep cost


def sweep_cost(stack: LocalStack, users: int, due_fraction: float, shards: int) -> dict[str, Any]:
    table = stack.outputs["TokensTableName"]
    loader = DynamoTokenStore(dynamodb_client(), table_name=table, shards=shards)
    now = time.time()
    due = round(users * due_fraction)
    population = [
        NewUser(
            device_token=str(uuid.uuid4()),
            instance="default",
            instance_id=INSTANCES["default"]["InstanceId"],
            # Due: expiring inside the margin. The others: a month away.
            tokens=fake_tokens(int(now) + (MARGIN // 2 if n < due else 30 * 86400)),
            client_id=f"bench-{n}",
        )
        for n in range(users)
    ]
    started = time.perf_counter()
    chunks = [population[i : i + 500] for i in range(0, users, 500)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda chunk: loader.put_new_users(chunk, now=now), chunks))
    load_seconds = time.perf_counter() - started

    client = dynamodb_client()
    meter = QueryMeter(client)
    queue = InMemoryRefreshJobQueue()
    sweeper = Sweeper(
        store=DynamoTokenStore(client, table_name=table, shards=shards),
        queue=queue,
        margin_seconds=MARGIN,
        spread_seconds=0,
        lease_seconds=60,
    )
    started = time.perf_counter()
    report = sweeper.sweep()
    sweep_seconds = time.perf_counter() - started
    assert report.users_due == due, report
    assert len(queue.jobs) == due, len(queue.jobs)
    # The reading part alone: every shard's due users, as the sweep pages through them.
    reader = DynamoTokenStore(dynamodb_client(), table_name=table, shards=shards)
    horizon = int(time.time()) + MARGIN
    started = time.perf_counter()
    for shard in range(shards):
        page = reader.query_due(shard=f"{shard:03d}", horizon=horizon, limit=500)
        while page.next_key:
            page = reader.query_due(shard=f"{shard:03d}", horizon=horizon, limit=500, start_key=page.next_key)
    query_seconds = time.perf_counter() - started
    return {
        "users": users,
        "due": due,
        "load_seconds": load_seconds,
        "items_read": report.items_read,
        "scanned": meter.scanned,
        "queries": meter.calls,
        "queued": len(queue.jobs),
        "sweep_seconds": sweep_seconds,
        "query_seconds": query_seconds,
    }


# ---------------------------------------------------------------------------------------- refresh throughput


def store_emulator_users(emulator: EmulatorHandle, store: TokenStore, count: int) -> None:
    """Create ``count`` users in the emulator (CreateMany, 100 a call) and store them with their tokens."""
    creds = InstanceCredentials.model_validate(INSTANCES["default"])
    client = UserServiceClient(emulator.url)
    now = time.time()
    users: list[NewUser] = []
    for start in range(0, count, 100):
        for result in client.create_many(creds, CreateManyRequest(quantity=min(100, count - start))):
            users.append(
                NewUser(
                    device_token=str(result.device_token),
                    instance="default",
                    instance_id=INSTANCES["default"]["InstanceId"],
                    tokens=tokens_of(result, now),
                )
            )
    client.close()
    store.put_new_users(users, now=now)


def sqs_event(jobs: list[RefreshJob], queue_arn: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": "bench",
                "body": job.to_body(),
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": str(int(time.time() * 1000))},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            }
            for job in jobs
        ]
    }


def worker_refresher(stack: LocalStack, concurrency: int) -> TokenRefresher:
    """A worker container's refresher, built by the function's own wiring from its environment."""
    env = stack.function_environment("RefreshWorkerFunction") | {
        "UPSTREAM_CONCURRENCY": str(concurrency),
        "REFRESH_MARGIN_SECONDS": str(MARGIN),
        "POWERTOOLS_LOG_LEVEL": "WARNING",
    }
    with environment(env):
        return build_refresher(ServiceSettings())


def in_memory_refresher(emulator: EmulatorHandle, store: InMemoryTokenStore, concurrency: int) -> TokenRefresher:
    """The same refresher on an in-memory store: what the workers do when storage costs nothing."""
    build_models()  # as the function's set-up does, before batches validate on several threads
    return TokenRefresher(
        upstream=UserServiceClient(emulator.url, max_connections=concurrency * 2),
        store=store,
        credentials=StaticCredentials(INSTANCES),
        publisher=RecordingPublisher(),
        margin_seconds=MARGIN,
        timing=ServiceSettings().lease_timing,
    )


class CallCounter:
    """Counts the calls a boto3 client makes (a botocore ``before-call`` hook)."""

    def __init__(self, client: Any) -> None:
        self.calls = 0
        self._lock = threading.Lock()
        client.meta.events.register("before-call.dynamodb", self._count)

    def _count(self, **_: Any) -> None:
        with self._lock:
            self.calls += 1


def moto_capacity(table: str, shards: int, concurrency: int, seconds: float = 3.0) -> float:
    """Refreshes per second moto could carry with an instant upstream: the store calls of a refresh, no HTTP.

    One round is what :meth:`TokenRefresher.refresh_job` asks of the store for a due user: the lease (its
    condition carries the due checks, so no read comes first) and the commit, through :class:`DynamoTokenStore`
    on an item of the store's shape (so both indexes are kept up), each thread on a user of its own.
    """
    store = DynamoTokenStore(dynamodb_client(concurrency), table_name=table, shards=shards)
    users = [str(uuid.uuid4()) for _ in range(concurrency)]
    now = time.time()
    store.put_new_users(
        [
            NewUser(
                device_token=u,
                instance="default",
                instance_id=INSTANCES["default"]["InstanceId"],
                tokens=fake_tokens(int(now)),
                client_id=f"capacity-{u}",
            )
            for u in users
        ],
        now=now,
    )
    deadline = time.perf_counter() + seconds
    done = [0] * concurrency

    def loop(index: int) -> None:
        version = 1
        while time.perf_counter() < deadline:
            owner = str(uuid.uuid4())
            now = time.time()
            assert store.acquire_lease(
                device_token=users[index], version=version, owner=owner, now=now, ttl=60, due_by=int(now) + 9000
            )
            store.commit_tokens(
                device_token=users[index],
                expected_version=version,
                owner=owner,
                tokens=fake_tokens(int(time.time()) + 7200),
                now=time.time(),
            )
            version += 1
            done[index] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(loop, range(concurrency)))
    return sum(done) / (time.perf_counter() - started)


def run_workers(
    refreshers: list[TokenRefresher], jobs: list[RefreshJob], concurrency: int, queue_arn: str
) -> tuple[float, float, int, list[float]]:
    """Each refresher is one worker container taking SQS batches of 10 jobs until none are left.

    Returns the wall time, this process's CPU time, the failed records and each batch's duration.
    """
    batches = collections.deque(jobs[i : i + 10] for i in range(0, len(jobs), 10))
    lock = threading.Lock()
    failures: list[Any] = []
    durations: list[float] = []

    def work(refresher: TokenRefresher) -> None:
        while True:
            with lock:
                if not batches:
                    return
                batch = batches.popleft()
            batch_started = time.perf_counter()
            response = handle_refresh_batch(sqs_event(batch, queue_arn), refresher, concurrency=concurrency)
            durations.append(time.perf_counter() - batch_started)
            failures.extend(response["batchItemFailures"])

    started, cpu_started = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=work, args=(r,)) for r in refreshers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, time.process_time() - cpu_started, len(failures), durations


def refresh_throughput(
    stack: LocalStack,
    emulator: EmulatorHandle,
    users: int,
    workers: int,
    concurrency: int,
    latency_ms: int,
    *,
    in_memory: bool = False,
) -> dict[str, Any]:
    """Refresh ``users`` due users with ``workers`` x ``concurrency`` in flight; DynamoDB in moto, or in memory."""
    table = stack.outputs["TokensTableName"]
    shards = int(stack.parameters["RefreshIndexShards"])
    memory = InMemoryTokenStore(shards=shards)
    store: TokenStore = memory if in_memory else DynamoTokenStore(dynamodb_client(), table_name=table, shards=shards)
    emulator.clear_faults()
    emulator.set_config(token_lifetime_s=MARGIN // 2)  # issued due
    store_emulator_users(emulator, store, users)
    emulator.set_config(token_lifetime_s=7200)  # refreshed: fresh
    queue = InMemoryRefreshJobQueue()
    Sweeper(store=store, queue=queue, margin_seconds=MARGIN, spread_seconds=0, lease_seconds=60).sweep()
    jobs = [job for job, _ in queue.jobs]
    assert len(jobs) == users, len(jobs)
    if in_memory:
        refreshers = [in_memory_refresher(emulator, memory, concurrency) for _ in range(workers)]
        counters = []
    else:
        refreshers = [worker_refresher(stack, concurrency) for _ in range(workers)]
        # The store's client (what the worker's wiring built), to count the DynamoDB calls of a refresh.
        counters = [CallCounter(r._store._client) for r in refreshers]
    # Warm each container's connections (a Lambda container is warm after its first batch). The token has more
    # than a minute left, so this only reads it: no upstream call.
    for refresher in refreshers:
        refresher.valid_token(device_token=jobs[0].device_token)
    calls_before = sum(c.calls for c in counters)
    emulator.set_faults(latency_ms=latency_ms, calls=["refresh", "login"])
    before = emulator.counters()

    elapsed, cpu, failures, durations = run_workers(refreshers, jobs, concurrency, stack.queue_arn("RefreshQueue"))

    after = emulator.counters()
    emulator.clear_faults()
    refreshed = after["refreshes"] - before["refreshes"]
    return {
        "store": "in memory" if in_memory else "DynamoDB (moto)",
        "users": users,
        "workers": workers,
        "concurrency": concurrency,
        "latency_ms": latency_ms,
        "elapsed": elapsed,
        "cpu": cpu,
        "refreshed": refreshed,
        "rate": refreshed / elapsed,
        "ideal": workers * concurrency / (latency_ms / 1000),
        "failures": failures,
        "median_batch_ms": statistics.median(durations) * 1000,
        "rejected": after["rejected_refresh_tokens"] - before["rejected_refresh_tokens"],
        "logins": after["logins"] - before["logins"],
        "dynamodb_calls_per_refresh": (sum(c.calls for c in counters) - calls_before) / max(1, refreshed),
        "moto_rounds_per_second": 0.0 if in_memory else moto_capacity(table, shards, workers * concurrency),
    }


# --------------------------------------------------------------------------------------------------- report


def machine() -> str:
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=False).stdout.strip()
    return f"`{uname or platform.platform()}`, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def render(sweep: dict[str, Any], refreshes: list[dict[str, Any]]) -> str:
    ratio = sweep["scanned"] / sweep["due"]
    target = "target <= 1.2" + ("" if ratio <= 1.2 else " (MISSED)")
    rows = [
        ("users in the table / due (within the margin)", f"{sweep['users']} / {sweep['due']}", ""),
        (
            "items read by the sweep / users due",
            f"{sweep['scanned']} / {sweep['due']} (own count {sweep['items_read']}, {sweep['queries']} queries)",
            f"**{ratio:.2f}** ({target}; a Scan: {sweep['users'] / sweep['due']:.0f})",
        ),
        ("refresh jobs queued", str(sweep["queued"]), f"expected {sweep['due']}"),
        (
            "sweep duration: shard queries (in parallel) + a conditional write per due user",
            f"{sweep['sweep_seconds']:.2f} s",
            f"the queries alone, one after another: {sweep['query_seconds']:.2f} s",
        ),
    ]
    for r in refreshes:
        rows.append(
            (
                f"refresh throughput, {r['store']}: {r['workers']} workers x {r['concurrency']} in flight, "
                f"{r['latency_ms']} ms upstream",
                f"{r['refreshed']} in {r['elapsed']:.2f} s = **{r['rate']:.0f}/s** (median batch of 10: "
                f"{r['median_batch_ms']:.0f} ms; CPU here {r['cpu']:.1f} s)",
                f"**{r['rate'] / r['ideal']:.2f}** of ideal {r['ideal']:.0f}/s",
            )
        )
        if r["moto_rounds_per_second"]:
            rows.append(
                (
                    "  DynamoDB calls per refresh; the same store calls with no upstream, same concurrency",
                    f"{r['dynamodb_calls_per_refresh']:.1f}; {r['moto_rounds_per_second']:.0f} rounds/s",
                    f"moto alone caps refreshes at ~{r['moto_rounds_per_second']:.0f}/s",
                )
            )
        rows.append(
            (
                "  failed records / rejected refresh tokens / logins",
                f"{r['failures']} / {r['rejected']} / {r['logins']}",
                "expected 0 / 0 / 0",
            )
        )
    lines = ["| measure | result | ratio / target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20000, help="users in the table for the sweep (default 20000)")
    parser.add_argument("--due-fraction", type=float, default=0.01, help="share of them due (default 0.01)")
    parser.add_argument("--refresh-users", type=int, default=300, help="users refreshed for throughput (300)")
    parser.add_argument("--latency-ms", type=int, default=50, help="emulator latency for the refreshes (50)")
    parser.add_argument("--workers", type=int, default=2, help="worker containers (RefreshMaximumConcurrency, 2)")
    parser.add_argument("--concurrency", type=int, default=10, help="records in flight per worker (10)")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.relative_to(REPO_ROOT)}")
    args = parser.parse_args(argv)

    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    with moto_server() as endpoint, running_emulator(instances=INSTANCES) as emulator:
        print(f"emulator {emulator.login_limit_line}")

        def stack(name: str) -> LocalStack:
            return provision(
                endpoint,
                template_path=REPO_ROOT / "template.yaml",
                parameters={"UserServiceUrl": emulator.url, "LogLevel": "WARNING"},
                stack_name=name,
                instance_credentials=INSTANCES,
            )

        sweep_stack = stack("refresh-bench-sweep")
        sweep = sweep_cost(
            sweep_stack, args.users, args.due_fraction, int(sweep_stack.parameters["RefreshIndexShards"])
        )
        refreshes = [
            refresh_throughput(
                stack(f"refresh-bench-{kind}"),
                emulator,
                args.refresh_users,
                args.workers,
                args.concurrency,
                args.latency_ms,
                in_memory=kind == "memory",
            )
            for kind in ("dynamodb", "memory")
        ]

    table = render(sweep, refreshes)
    header = (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC} on {machine()}; load average before the run "
        f"{load_before}.\n\n"
        f"`{' '.join(['bench/refresh_bench.py', *(argv if argv is not None else sys.argv[1:])])}` - moto server in "
        f"its own process; emulator latency {args.latency_ms} ms for the refreshes; margin {MARGIN} s; "
        f"{sweep_stack.parameters['RefreshIndexShards']} index shards.\n"
    )
    notes = """
Notes.

- *Items read* is the `ScannedCount` DynamoDB reports for the sweep's Queries of the sparse `RefreshDue` index
  (summed by a botocore hook), i.e. what DynamoDB would bill; it equals the sweep's own count. moto itself walks
  every item of the table on each index Query, so the sweep's *duration* here grows with the table; on DynamoDB
  it grows with the users due.
- Throughput with DynamoDB in moto is bounded by moto, not by the workers: a refresh makes 2 DynamoDB calls
  (the lease, whose condition carries the due checks, and the commit), and moto carries only about as many of
  those rounds per second as the row below it says even with no upstream at all (measured through the same
  `DynamoTokenStore` calls).
- The in-memory row runs the same handler, batch processor, refresher and HTTP client with the store in memory:
  what the worker design achieves when storage is not the limit. An SQS batch ends with its slowest record, so
  a worker's rate is at most 10 per *median batch* time (the ideal assumes every slot busy all the time, i.e. a
  batch taking exactly the upstream latency).
- Everything (both workers, moto's client side) runs in one process with one GIL, on a shared 2-CPU machine
  where other test suites and benchmarks were running (see the load average): the throughput rows move by
  tens of percent from run to run; the items-read ratio does not move.
"""
    print(table)
    print(json.dumps({"sweep": sweep, "refresh": refreshes}, default=str))
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(f"# Refresh benchmark\n\n{header}\n{table}\n{notes}")
        print(f"written to {RESULTS.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
