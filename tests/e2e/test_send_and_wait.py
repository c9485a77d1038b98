"""``--wait``: ``local.send`` and ``telematics-reg load`` report what became of each row (registered, duplicate,
dead-lettered with its reason) instead of "sent"; ``load`` checks each row's Instance before sending anything, and a
finished load run again stays complete."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from local import send
from local.runner import LocalService, RuntimeOptions
from telematics_cli.app import _default_min_validity
from telematics_cli.app import main as cli
from telematics_cli.target import from_local
from telematics_cli.users import UserRef, find_user

from .conftest import ROOT

REVOKED = "revoked"


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("wait")
    service = LocalService(
        template_path=ROOT / "template.yaml",
        stack_name="wait",
        region="sa-east-1",
        parameters={"LogLevel": "WARNING", "RefreshMarginSeconds": "60"},
        token_lifetime=120,
        unknown_instances={REVOKED: {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())}},
        options=RuntimeOptions(failure_visibility_timeout=0, schedule_interval=30.0, async_retry_delay=0.2),
        state_path=folder / "stack.json",
    )
    with service:
        yield folder / "stack.json"


def _json_out(text: str) -> dict[str, Any]:
    # The handlers run in this process and print metric lines too: the report is the object with "outcomes".
    start = text.index('{\n  "file"')
    document: dict[str, Any] = json.JSONDecoder().raw_decode(text, start)[0]
    return document


def test_local_send_wait_reports_registered_duplicate_and_dead_lettered(
    stack_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client_id = f"wait-{uuid.uuid4().hex[:8]}"
    bodies = [
        json.dumps({"ClientId": client_id}),
        json.dumps({"ClientId": client_id, "FirstName": "Again"}),
        json.dumps({"ClientId": f"bad-{client_id}", "Gender": "Robot"}),
        "{not json",
    ]

    code = send.main(["--stack", str(stack_file), "message", *bodies, "--wait", "--timeout", "60"])

    out = capsys.readouterr().out
    statuses = [line.split()[1] for line in out.splitlines() if line.startswith("  ")]
    assert sorted(statuses[:2]) == ["duplicate", "registered"]  # one of the two made the user, the other found it
    assert "dead-lettered invalid_fields" in out
    assert "dead-lettered not_json" in out
    assert code == 1  # not every message was registered


def test_local_send_wait_on_a_signup_and_a_bulk(stack_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    client_id = f"signup-{uuid.uuid4().hex[:8]}"

    assert send.main(["--stack", str(stack_file), "signup", json.dumps({"ClientId": client_id}), "--wait"]) == 0
    assert "registered" in capsys.readouterr().out
    assert send.main(["--stack", str(stack_file), "bulk", "3", "--wait", "--timeout", "60"]) == 0
    assert "3 users stored" in capsys.readouterr().out


def test_local_send_wait_times_out_on_a_registration_still_being_retried(
    stack_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = json.dumps({"ClientId": f"slow-{uuid.uuid4().hex[:8]}", "Instance": REVOKED})

    code = send.main(["--stack", str(stack_file), "message", body, "--wait", "--timeout", "1"])

    assert code == 1
    assert "pending" in capsys.readouterr().out


def test_local_send_load_of_a_missing_file_says_how_to_write_one(
    stack_file: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = send.main(["--stack", str(stack_file), "load", str(tmp_path / "users.jsonl")])

    err = capsys.readouterr().err
    assert code == 1
    assert "no such file" in err
    assert "printf" in err
    assert "Errno" not in err


def test_load_wait_reports_each_row(stack_file: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    existing = f"old-{uuid.uuid4().hex[:8]}"
    assert send.main(["--stack", str(stack_file), "message", json.dumps({"ClientId": existing}), "--wait"]) == 0
    fresh = f"new-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "users.jsonl"
    lines = [{"ClientId": fresh}, {"ClientId": existing}, {"Quantity": 2}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    capsys.readouterr()

    code = cli(["--local-stack", str(stack_file), "load", str(path), "--wait", "--timeout", "60", "--json"])

    report = _json_out(capsys.readouterr().out)
    assert code == 0
    assert [(row["row"], row["status"]) for row in report["sent_rows"]] == [
        ("line 1", "registered"),
        ("line 2", "duplicate"),
        ("line 3", "registered"),
    ]
    assert report["outcomes"] == {"registered": 2, "duplicate": 1}
    assert "2 users stored" in report["sent_rows"][2]["detail"]


def test_load_refuses_a_row_for_an_instance_the_secret_does_not_have(
    stack_file: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "instances.jsonl"
    path.write_text(
        json.dumps({"ClientId": "a", "Instance": "default"})
        + "\n"
        + json.dumps({"ClientId": "b", "Instance": "nowhere"})
        + "\n",
        encoding="utf-8",
    )

    code = cli(["--local-stack", str(stack_file), "load", str(path), "--json"])

    report = _json_out(capsys.readouterr().out)
    assert code == 1
    assert report["sent"] == 0
    assert report["errors"] == [
        {
            "line": 2,
            "problems": [
                {"field": "Instance", "message": "unknown instance 'nowhere': the credentials secret has no such alias"}
            ],
        }
    ]
    dry = cli(["--local-stack", str(stack_file), "load", str(path), "--dry-run", "--json"])
    assert dry == 1  # a dry run with a stack at hand checks it too
    capsys.readouterr()


def test_a_finished_load_run_again_stays_complete(
    stack_file: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "done.jsonl"
    path.write_text(json.dumps({"ClientId": f"done-{uuid.uuid4().hex[:8]}"}) + "\n", encoding="utf-8")
    state = Path(str(path) + ".load-state.json")

    assert cli(["--local-stack", str(stack_file), "load", str(path), "--no-progress"]) == 0
    assert [entry["complete"] for entry in json.loads(state.read_text())["loads"].values()] == [True]
    assert cli(["--local-stack", str(stack_file), "load", str(path), "--no-progress"]) == 0

    assert [entry["complete"] for entry in json.loads(state.read_text())["loads"].values()] == [True]
    assert "every row was already sent" in capsys.readouterr().err


def test_dlq_list_does_not_wait_on_empty_queues(stack_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    send.main(["--stack", str(stack_file), "message", "[1]", "--wait", "--timeout", "30"])
    capsys.readouterr()
    started = time.monotonic()

    code = cli(["--local-stack", str(stack_file), "dlq", "list", "--json"])

    elapsed = time.monotonic() - started
    assert code == 0
    assert '"reason": "not_an_object"' in capsys.readouterr().out
    # Two of the four queues are empty: each costs one attribute read, not a second of long polling.
    assert elapsed < 4.0, elapsed


def test_token_min_validity_defaults_to_half_a_short_token_lifetime(
    stack_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client_id = f"token-{uuid.uuid4().hex[:8]}"
    assert send.main(["--stack", str(stack_file), "message", json.dumps({"ClientId": client_id}), "--wait"]) == 0
    capsys.readouterr()
    target = from_local(stack_file)
    before = find_user(target, UserRef(client_id, "default", None))
    assert before is not None

    assert _default_min_validity(target, UserRef(client_id, "default", None)) == 60  # tokens here live 120 s
    code = cli(["--local-stack", str(stack_file), "token", "--client-id", client_id])

    after = find_user(target, UserRef(client_id, "default", None))
    assert code == 0
    assert after is not None
    assert after["Version"] == before["Version"]  # a fresh token is handed out as it is, not refreshed
