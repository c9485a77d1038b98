"""``make soak`` kept working: bench/soak.py end to end with tiny sizes (well under a minute), as a user runs it.

Everything the full soak does happens here too, only smaller and faster: faults on, duplicates, both paths,
malformed messages, a bulk request, the runner killed mid-run and restarted, revoked and dead tokens, two sweepers,
every user refreshed. Claims and leases are shortened (so is the simulated visibility timeout, still longer
than both) so that the kill's orphans come back within seconds.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from .conftest import ROOT

SMOKE = (
    *("--signups", "20", "--registrations", "20", "--both-paths", "4", "--bulk", "120", "--rate", "5"),
    *("--malformed-rate", "0.1", "--token-lifetime", "70", "--sweep-every", "3", "--cycles", "1"),
    *("--dead-tokens", "1", "--revoke-fraction", "0.05"),
    *("--claim-seconds", "10", "--lease-seconds", "10", "--orphan-visibility", "12", "--kill-after-refreshes", "0"),
    # Issue 11's phases and issue 14's traffic, tiny: a runner 1.5 s ahead (2 s of skew allowed in a quick run),
    # 6 s of slow answers, a bulk of 30 without CreateMany, the redrive (on by default); lifecycle rates as default.
    *("--clock-offset", "1.5", "--slow-seconds", "6", "--big-bulk", "30"),
    # About 70 s on an idle 2-CPU machine: the run's own limit leaves three times that for a loaded one.
    *("--failure-visibility", "3", "--async-retry-delay", "2", "--timeout", "200", "--seed", "11"),
)


def test_the_soak_runs_checks_every_invariant_and_records_its_results(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "layers" / "telematics"), str(ROOT)]),
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable,
        str(ROOT / "bench" / "soak.py"),
        *SMOKE,
        *("--workdir", str(tmp_path / "soak"), "--results", str(results), "--label", "smoke"),
    ]

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)

    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "RESULT: OK" in done.stdout, output
    assert "killed (SIGKILL)" in done.stdout
    assert "visibility timeout of the" in done.stdout
    summary = done.stdout.split("soak summary", 1)[1]
    for heading in (
        "One upstream user per ClientId",
        "Users stored vs expected",
        "Bulk request never doubled",
        "Bulk without CreateMany continued",
        "Operator redrive",
        "RegistrationDeadLetterQueue",
        "SignupDeadLetterQueue",
        "LifecycleDeadLetterQueue",
        "Deleted users: nothing left",
        "Deleted users: none resurrected upstream",
        "Stale changes applied",
        "Upstream profile and flags = last change",
        "Admin Logins",
        "No token lost",
        "Refresh tokens rejected",
        "No secret in logs, events, dead letters",
        "Upstream concurrency bounded",
        "The soak did what it claims",
    ):
        line = next(line for line in summary.splitlines() if heading in line)
        assert line.startswith("ok"), line
    # 20 + 20, 4 of them on both paths; 1 of them deleted, and 1 more deleted racing its registration.
    assert "35/35 ClientIds have exactly 1 upstream user, 2/2 deleted ones have none" in summary
    assert "made upstream but not stored 0" in summary
    recorded = results.read_text(encoding="utf-8")
    assert "### Soak: smoke" in recorded
    assert "| One upstream user per ClientId | ok |" in recorded
    assert "signup -> stored latency" in recorded


def _soak_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak_under_test", ROOT / "bench" / "soak.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _end_state(soak: ModuleType, per_client: dict[str, int], *, delete_rate: float = 0.0) -> Any:
    options = soak.SoakOptions(
        signups=6,
        registrations=6,
        both_paths=2,
        bulk=0,
        malformed_rate=0.5,
        seed=3,
        update_rate=0,
        delete_rate=delete_rate,
        move_rate=0,
        deactivate_rate=0,
    )
    work = soak.build_workload(options)
    return soak.EndState(
        soak=SimpleNamespace(work=work, instance_id="instance-1", instance_ids={"default": "instance-1"}),
        m=soak.Measures(),
        counters={"users_by_client_id": per_client, "creates": len(per_client), "logins": 0},
        by_device={},
        users=[],
        letters={},
        runner_events=[],
        kill=soak.KillRecord(),
        revoke=soak.RevokeRecord(),
    )


def test_the_gate_fails_on_a_duplicate_upstream_user_or_bad_input_that_reached_the_upstream() -> None:
    # The checks that decide the exit status, fed an end state that breaks the invariant (and one that keeps it).
    soak = _soak_module()
    good = _end_state(soak, {})
    exact = {f"instance-1/{cid}": 1 for cid in good.soak.work.client_ids}
    good.counters["users_by_client_id"] = exact
    first = good.soak.work.client_ids[0]
    doubled = _end_state(soak, {**exact, f"instance-1/{first}": 2})
    lost = _end_state(soak, {k: n for k, n in exact.items() if not k.endswith(first)})
    marker = next(m.marker for m in good.soak.work.malformed)
    leaked = _end_state(soak, {**exact, f"instance-1/{marker}": 1})

    assert soak.check_one_user_per_client(good).ok
    assert soak.check_bad_input(good).ok
    assert not soak.check_one_user_per_client(doubled).ok
    assert "1 have 2" in soak.check_one_user_per_client(doubled).detail
    assert not soak.check_one_user_per_client(lost).ok
    assert not soak.check_bad_input(leaked).ok


def test_the_gate_fails_on_a_deleted_user_left_upstream() -> None:
    soak = _soak_module()
    good = _end_state(soak, {}, delete_rate=0.2)
    gone = good.soak.work.gone
    assert gone  # deletions drawn, and one racing its registration
    exact = {f"instance-1/{cid}": 1 for cid in good.soak.work.client_ids if cid not in gone}
    good.counters["users_by_client_id"] = exact
    deleted = sorted(gone)[0]
    resurrected = _end_state(soak, {**exact, f"instance-1/{deleted}": 1}, delete_rate=0.2)

    assert soak.check_one_user_per_client(good).ok
    check = soak.check_one_user_per_client(resurrected)
    assert not check.ok
    assert "deleted but upstream" in check.detail


def test_options_that_break_the_simulations_timing_are_refused() -> None:
    # A simulated visibility timeout shorter than a claim would let a redelivery find its dead holder's claim alive.
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--orphan-visibility", "30"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--orphan-visibility must exceed" in done.stderr
