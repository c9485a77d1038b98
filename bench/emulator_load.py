"""Load the User Service emulator with concurrent clients and report throughput, errors and latency.

Usage (from the repository root):

    .venv/bin/python bench/emulator_load.py                      # 50 clients, 60 s, own emulator, no faults
    .venv/bin/python bench/emulator_load.py --duration 10 --clients 20
    .venv/bin/python bench/emulator_load.py --error-rate 0.05 --rate-limit-rate 0.02 --drop-rate 0.01
    .venv/bin/python bench/emulator_load.py --url http://127.0.0.1:8081 --instances @creds.json

Each client has its own pooled ``requests.Session`` and loops: Create (with a unique ClientId), Refresh on
the observed and the spec path, Login every third loop, CreateMany every tenth. After a fault that may have
rotated its tokens (a dropped answer or a timeout) a client recovers by Login, as the service would.

Errors are classified; an error counts as *injected* only when the run asked for that kind of fault.
At the end the emulator's counters are compared with what the clients saw. The exit status is 1 when an
error was not injected or a counter disagrees, 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from local.emulator.testing import EmulatorHandle, running_emulator  # noqa: E402

CALLS = ("create", "refresh", "login", "create_many")


@dataclass
class Tally:
    """What one client saw."""

    ok: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)  # call -> answers lost (drop or timeout)
    examples: dict[str, str] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    create_many_users: int = 0


@dataclass(frozen=True)
class Faults:
    latency_ms: list[float] | float
    error_rate: float
    error_status: int
    rate_limit_rate: float
    hang_rate: float
    hang_s: float
    drop_rate: float

    @property
    def any(self) -> bool:
        return any((self.error_rate, self.rate_limit_rate, self.hang_rate, self.drop_rate))

    def admin_json(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "error_rate": self.error_rate,
            "error_status": self.error_status,
            "rate_limit_rate": self.rate_limit_rate,
            "retry_after_s": 0,
            "hang_rate": self.hang_rate,
            "hang_s": self.hang_s,
            "drop_after_commit_rate": self.drop_rate,
            "script": [],
        }

    def injected(self, kind: str) -> bool:
        return (
            (kind == f"http_{self.error_status}" and self.error_rate > 0)
            or (kind == "http_429" and self.rate_limit_rate > 0)
            or (kind == "timeout" and self.hang_rate > 0)
            or (kind == "connection" and self.drop_rate > 0)
        )


class Client:
    def __init__(self, emulator: EmulatorHandle, alias: str, index: int, timeout_s: float) -> None:
        self.emulator = emulator
        self.alias = alias
        self.index = index
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.tally = Tally()
        self.headers = emulator.headers(alias)

    def call(self, name: str, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
        """POST and return the Result, or ``None`` after recording the error's kind."""
        started = time.perf_counter()
        kind: str | None = None
        result: Any = None
        try:
            response = self.session.post(self.emulator.url + path, json=body, headers=headers, timeout=self.timeout_s)
            if response.status_code == 200 and response.json().get("Status") == 200:
                result = response.json()["Result"]
            else:
                kind = f"http_{response.status_code}"
                self.tally.examples.setdefault(kind, f"{name}: {response.text[:200]}")
        except requests.Timeout:
            kind = "timeout"
        except requests.ConnectionError as exc:
            kind = "connection"
            self.tally.examples.setdefault(kind, f"{name}: {exc!r}"[:200])
        self.tally.latencies_ms.append((time.perf_counter() - started) * 1000)
        if kind is None:
            self.tally.ok[name] += 1
        else:
            self.tally.errors[kind] += 1
            if kind in {"timeout", "connection"}:
                self.tally.lost[name] += 1
        return result

    def login(self, device_token: str) -> Any:
        body = {"LoginFields": json.dumps({"Devicetoken": device_token}), "Password": self.headers["InstanceKey"]}
        return self.call("login", "/v1/Auth/Login", body, {"InstanceId": self.headers["InstanceId"]})

    def refresh(self, pair: dict[str, Any], path: str) -> Any:
        body = {"AccessToken": pair["AccessToken"]["Token"], "RefreshToken": pair["RefreshToken"]}
        return self.call("refresh", path, body)

    def run(self, deadline: float) -> None:
        loop = 0
        while time.monotonic() < deadline:
            loop += 1
            client_id = f"bench-{self.index}-{loop}-{uuid.uuid4().hex[:8]}"
            pair = self.call("create", "/v1/Registration/Create", {"UserFields": {"ClientId": client_id}}, self.headers)
            if pair is None:
                continue
            device_token = pair["DeviceToken"]
            steps = ["/v1/Auth/RefreshToken", "/v1/RefreshToken", *(["login"] if loop % 3 == 0 else [])]
            for step in steps:
                if time.monotonic() >= deadline:
                    break
                lost_before = self.tally.lost.total()
                new_pair = self.login(device_token) if step == "login" else self.refresh(pair, step)
                if new_pair is None and self.tally.lost.total() > lost_before:
                    # The lost answer may have carried the only copy of the rotated tokens: log in again.
                    new_pair = self.login(device_token)
                if new_pair is None:
                    break
                pair = new_pair
            if loop % 10 == 0:
                many = self.call("create_many", "/v1/Registration/CreateMany", {"Quantity": 2}, self.headers)
                if many is not None:
                    self.tally.create_many_users += len(many["Results"])
        self.session.close()


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def parse_latency(text: str) -> list[float] | float:
    parts = [float(part) for part in text.split(",")]
    return parts[0] if len(parts) == 1 else parts[:2]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--url", help="an emulator already running (default: start one)")
    parser.add_argument("--instances", help="its credentials JSON or @file (needed with --url)")
    parser.add_argument("--timeout", type=float, default=10.0, help="client read timeout, s (default 10)")
    parser.add_argument("--latency-ms", default="0", help="injected latency: N or MIN,MAX (default 0)")
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--error-status", type=int, default=503)
    parser.add_argument("--rate-limit-rate", type=float, default=0.0)
    parser.add_argument("--hang-rate", type=float, default=0.0)
    parser.add_argument("--hang-s", type=float, default=0.0, help="default: twice the client timeout")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="drop_after_commit rate")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    return parser.parse_args(argv)


@contextlib.contextmanager
def emulator_for(args: argparse.Namespace) -> Iterator[EmulatorHandle]:
    if args.url is None:
        instances = {
            alias: {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())}
            for alias in ("default", "fleet-eu")
        }
        with running_emulator(
            instances,
            login_limit_per_minute=0,
            login_limit_reason="a load test of the emulator itself (every client logs in every third loop)",
        ) as emulator:
            print(f"emulator {emulator.login_limit_line}: a load test of the emulator itself, not of the service")
            yield emulator
        return
    if not args.instances:
        raise SystemExit("--url needs --instances (the emulator's credentials JSON or @file)")
    text = Path(args.instances[1:]).read_text() if args.instances.startswith("@") else args.instances
    emulator = EmulatorHandle.attach(args.url, json.loads(text))
    try:
        yield emulator
    finally:
        emulator.close()


def check_counters(counters: dict[str, Any], tallies: list[Tally], faults: Faults, before: dict[str, Any]) -> list[str]:
    """Disagreements between the emulator's counters (as deltas over the run) and what the clients saw."""

    def delta(name: str) -> int:
        return int(counters[name]) - int(before[name])

    ok: Counter[str] = sum((tally.ok for tally in tallies), Counter())
    lost: Counter[str] = sum((tally.lost for tally in tallies), Counter())
    errors: Counter[str] = sum((tally.errors for tally in tallies), Counter())
    problems = []

    def expect(name: str, low: int, high: int | None = None) -> None:
        high = low if high is None else high
        if not low <= delta(name) <= high:
            problems.append(f"{name}: emulator {delta(name)}, clients imply {low}..{high}")

    # A lost answer (dropped or timed out) may or may not have committed, so it widens the range.
    expect("creates", ok["create"], ok["create"] + lost["create"])
    expect("refreshes", ok["refresh"], ok["refresh"] + lost["refresh"])
    expect("logins", ok["login"], ok["login"] + lost["login"])
    expect("create_many_calls", ok["create_many"], ok["create_many"] + lost["create_many"])
    expect("requests_total", sum(len(tally.latencies_ms) for tally in tallies))
    if delta("users_total") != delta("creates") + delta("create_many_users"):
        problems.append("users_total != creates + create_many_users")
    if not faults.any:
        expect("rejected_refresh_tokens", 0)
        expect("failed_logins", 0)
    served = {kind: counters["faults_served"][kind] - before["faults_served"][kind] for kind in before["faults_served"]}
    if faults.error_rate and served["error"] != errors[f"http_{faults.error_status}"]:
        problems.append(f"faults_served.error {served['error']} != {errors[f'http_{faults.error_status}']} seen")
    if faults.rate_limit_rate and served["rate_limit"] != errors["http_429"]:
        problems.append(f"faults_served.rate_limit {served['rate_limit']} != {errors['http_429']} seen")
    if faults.drop_rate and served["drop_after_commit"] != errors["connection"]:
        problems.append(f"faults_served.drop_after_commit {served['drop_after_commit']} != {errors['connection']} seen")
    return problems


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    faults = Faults(
        latency_ms=parse_latency(args.latency_ms),
        error_rate=args.error_rate,
        error_status=args.error_status,
        rate_limit_rate=args.rate_limit_rate,
        hang_rate=args.hang_rate,
        hang_s=args.hang_s or 2 * args.timeout,
        drop_rate=args.drop_rate,
    )
    with emulator_for(args) as emulator:
        emulator.set_faults(**faults.admin_json())
        before = emulator.counters()
        aliases = sorted(emulator.instances)
        clients = [
            Client(emulator, aliases[index % len(aliases)], index, args.timeout) for index in range(args.clients)
        ]
        started = time.monotonic()
        deadline = started + args.duration
        threads = [threading.Thread(target=client.run, args=(deadline,), daemon=True) for client in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        if faults.hang_rate:
            time.sleep(faults.hang_s + 0.5)  # let hung calls finish committing before counting
        counters = emulator.counters()
        emulator.clear_faults()

    tallies = [client.tally for client in clients]
    errors: Counter[str] = sum((tally.errors for tally in tallies), Counter())
    ok: Counter[str] = sum((tally.ok for tally in tallies), Counter())
    latencies = [value for tally in tallies for value in tally.latencies_ms]
    unexpected = {kind: count for kind, count in errors.items() if not faults.injected(kind)}
    problems = check_counters(counters, tallies, faults, before)
    examples = {kind: text for tally in tallies for kind, text in tally.examples.items() if kind in unexpected}

    fault_text = json.dumps(faults.admin_json()) if faults.any or faults.latency_ms else "none"
    print(f"emulator load: {args.clients} clients for {elapsed:.1f} s against {emulator.url}; faults: {fault_text}")
    print(f"requests: {len(latencies)} ({len(latencies) / elapsed:.0f}/s)")
    print("ok by call: " + ", ".join(f"{call} {ok[call]}" for call in CALLS))
    if errors:
        for kind, count in sorted(errors.items()):
            label = "injected" if faults.injected(kind) else "NOT INJECTED"
            print(f"errors: {kind}: {count} ({label}){' e.g. ' + examples[kind] if kind in examples else ''}")
    else:
        print("errors: none")
    print(
        f"latency: p50 {percentile(latencies, 0.50):.1f} ms, p90 {percentile(latencies, 0.90):.1f} ms, "
        f"p99 {percentile(latencies, 0.99):.1f} ms, max {max(latencies, default=0):.1f} ms"
    )
    summary = {key: counters[key] - before[key] for key in ("users_total", "creates", "create_many_users")}
    summary |= {key: counters[key] - before[key] for key in ("refreshes", "logins", "rejected_refresh_tokens")}
    print("emulator counters (this run): " + ", ".join(f"{key} {value}" for key, value in summary.items()))
    print("counter check: " + ("consistent" if not problems else "; ".join(problems)))
    failed = bool(unexpected or problems)
    print("result: " + ("FAIL" if failed else "OK"))
    if args.json:
        print(
            json.dumps(
                {
                    "clients": args.clients,
                    "seconds": round(elapsed, 2),
                    "requests": len(latencies),
                    "ok": dict(ok),
                    "errors": dict(errors),
                    "unexpected_errors": unexpected,
                    "p50_ms": round(percentile(latencies, 0.5), 2),
                    "p99_ms": round(percentile(latencies, 0.99), 2),
                    "counter_problems": problems,
                }
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
