"""`make run` as a user runs it: ``python -m local.demo`` in its own process, with small sizes, must exit 0 and
print a summary in which every check passed (its own moto, emulator and runtime, nothing shared with this one)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from local.stack import LocalStack

from .conftest import ROOT, user_by_client, wait_for


def test_make_run_demo_exits_0_with_a_readable_summary(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "layers" / "telematics"), str(ROOT)]),
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable,
        "-m",
        "local.demo",
        *("--signups", "3", "--file-users", "6", "--bulk", "4", "--duplicates", "3"),
        *("--token-lifetime", "62", "--sweep-every", "1", "--timeout", "200", "--seed", "7"),
        *("--log-file", str(tmp_path / "run.log"), "--state", str(tmp_path / "stack.json")),
    ]

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=320, check=False)

    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "RESULT: OK" in done.stdout
    summary = done.stdout.split("summary", 1)[1]
    for heading in (
        "Users registered (DynamoDB)",
        "Upstream users per ClientId",
        "Duplicates suppressed",
        "Tokens refreshed",
        "RegistrationDeadLetterQueue",
        "SignupDeadLetterQueue",
        "LifecycleDeadLetterQueue",
        "Lifecycle: update, flags",
        "Lifecycle: deactivate, reactivate",
        "Lifecycle: move",
        "Lifecycle: deletions",
        "Lost chunk adopted",
        "Drift audit (reconcile)",
    ):
        line = next(line for line in summary.splitlines() if heading in line)
        assert line.startswith("ok"), line
    # 3 signups + 6 file lines + the scenarios' 10 ClientIds; the bulk of 4; the lost chunk's 5, adopted.
    assert "19 ClientIds once each, 4 bulk (4 ACTIVE, expected 4), 5 adopted" in summary
    assert "gone 1 · deactivated 1 · reflagged 1 · moved 1 · unstored 1" in summary
    assert "shortened from production's" in done.stdout
    assert "redriven after maxReceiveCount 1" in summary
    assert "RetriesExhausted: UnauthorizedError 1" in summary
    assert not (tmp_path / "stack.json").exists()  # removed at shutdown: it named a moto server now gone
    # The log can be followed: one JSON object per line, each handler line with its own function and correlation id.
    lines = [json.loads(text) for text in (tmp_path / "run.log").read_text(encoding="utf-8").splitlines()]
    assert lines
    assert all(isinstance(line, dict) for line in lines)
    stored = [line for line in lines if line.get("message") == "registration stored"]
    assert len(stored) >= 9 + 3  # every ClientId, and every duplicate delivery
    for line in stored:
        if "Signup" in line["function_name"]:
            # Signups carry only the app's ClientIds and the lifecycle/drift scenarios' (never a file line's).
            assert line["client_id"].startswith(("app-", "life-", "drift-")), line
            assert line["correlation_id"], line  # the UserSignedUp event's id
        else:
            assert line["function_name"].endswith("RegistrationQueueFunction"), line
            assert line["correlation_id"] == line["message_id"], line
    refreshes = [line for line in lines if line.get("message") == "tokens committed"]
    assert refreshes
    assert all(line["function_name"].endswith("RefreshWorkerFunction") for line in refreshes)


def test_serve_saves_the_stack_for_other_tools_takes_input_by_hand_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "layers" / "telematics"), str(ROOT)]),
        "PYTHONUNBUFFERED": "1",
    }
    state = tmp_path / "stack.json"
    serve = subprocess.Popen(
        [sys.executable, "-m", "local.demo", "--serve", "--state", str(state), "--log-file", str(tmp_path / "run.log")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(120, serve.kill)  # a hung start must fail the test, not hang the suite
    watchdog.start()
    try:
        assert serve.stdout is not None
        printed: list[str] = []
        for line in serve.stdout:
            printed.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(printed)
        assert "-m local.send signup" in text, text
        stack = LocalStack.load(state)
        assert stack.endpoint_url in text
        assert stack.outputs["RegistrationQueueUrl"] in text

        sent = subprocess.run(
            [sys.executable, "-m", "local.send", "--stack", str(state), "signup", '{"ClientId": "by-hand-1"}'],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        user = wait_for(lambda: user_by_client(stack, "by-hand-1"), timeout=30, what="the hand-sent signup stored")
        assert user["Status"] == "ACTIVE"
    finally:
        serve.send_signal(signal.SIGTERM)
        rest, _ = serve.communicate(timeout=60)
        watchdog.cancel()
    assert serve.returncode == 0, rest
    assert "stopped: moto, the emulator and the runtime are down" in rest
    assert not state.exists()
