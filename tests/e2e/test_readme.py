"""Every command of the README works exactly as printed, on a checkout with its .venv: each ```bash block is run
as it is written, from the repository root, against the local stack of `make run ARGS=--serve` (or the emulator
of `make emulator`), in a scratch copy of the checkout so that nothing here touches the real `.local-stack/`.

A block that cannot run here (it needs AWS, or runs for minutes) is listed in SKIPPED with the reason; a new block
must be placed in one list or the other, so no README command goes unchecked by accident. The emulator's fixed
port 8081 is replaced by a free one (other work may hold 8081 on this machine); nothing else is changed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, wait_for

README = ROOT / "README.md"
#: Blocks run against the local stack, in README order, by the first words of the block.
WITH_STACK = (
    ".venv/bin/python -m local.send signup",
    'grep \'"client_id"',
    ".venv/bin/python -m local.invoke SignupFunction",
    "printf 'ClientId,FirstName,Email,Instance",
)
WITH_EMULATOR = ("PORT=8081 EMULATOR_TOKEN_LIFETIME=60", "# Register a user")
SKIPPED = {
    "make run     # runs the whole service": "the two commands themselves: `make test` runs this test",
    "for i in $(seq 20); do make run": "twenty full runs (about 25 minutes); its result is recorded in the README",
    "aws secretsmanager create-secret": "needs an AWS account",
    "make build               # or: sam build": "needs the SAM CLI and an AWS account (make test runs sam build)",
    "aws events put-events": "needs an AWS account",
    "make emulator                    #": "starts a server that runs until stopped; the next block starts it too",
    "# Reconciliation": "needs a lost bulk and drift to show; tests/functional/test_reconcile.py runs these commands",
}
_LINKED = (".venv", "local", "layers", "functions", "events", "cli", "template.yaml", "Makefile", "pyproject.toml")


def bash_blocks() -> list[str]:
    """The ```bash blocks of the README, in order."""
    return re.findall(r"^ *```bash\n(.*?)^ *```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def _first(block: str) -> str:
    return block.strip()


def test_every_bash_block_is_run_or_skipped_for_a_reason() -> None:
    unplaced = [
        block.strip().splitlines()[0]
        for block in bash_blocks()
        if not any(_first(block).startswith(key) for key in (*WITH_STACK, *WITH_EMULATOR, *SKIPPED))
    ]
    assert unplaced == []


def _block(prefix: str) -> str:
    matches = [block for block in bash_blocks() if _first(block).startswith(prefix)]
    assert len(matches) == 1, prefix
    return matches[0]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("checkout")
    for name in _LINKED:
        (folder / name).symlink_to(ROOT / name)
    (folder / "requirements").symlink_to(ROOT / "requirements")
    return folder


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST", "COV_"))}
    env.pop("PYTHONPATH", None)  # as a new shell has it: make and the .venv scripts set up what they need
    return env


def _run(block: str, cwd: Path, *, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block],
        cwd=cwd,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{block}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def serving(checkout: Path) -> Iterator[Path]:
    process = subprocess.Popen(
        ["make", "run", "ARGS=--serve"],
        cwd=checkout,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: (checkout / ".local-stack" / "stack.json").exists() or process.poll() is not None,
            timeout=180,
            what="make run ARGS=--serve to save the stack",
            every=0.5,
        )
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        time.sleep(1.0)  # the runtime starts right after the stack is saved
        yield checkout
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(120)


def test_the_readme_commands_work_against_the_local_stack(serving: Path) -> None:
    # One test, in README order: a later block uses what an earlier one made (customer-8, the log lines).
    outputs = {prefix: _run(_block(prefix), serving).stdout for prefix in WITH_STACK}

    sent = outputs[WITH_STACK[0]]
    assert "registered" in sent
    assert "customer-8" in sent  # the trace at the end of the block found it
    assert "customer-8" in outputs[WITH_STACK[1]]  # grep found its lines in the log
    loaded = outputs[WITH_STACK[3]]
    assert "registered" in loaded or "duplicate" in loaded


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_emulator_commands_work(checkout: Path) -> None:
    port = str(_free_port())
    start = _block(WITH_EMULATOR[0]).replace("8081", port)
    process = subprocess.Popen(
        ["bash", "-c", start], cwd=checkout, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:

        def healthy() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", int(port))) == 0

        wait_for(healthy, timeout=120, what="make emulator to listen", every=0.5)
        done = _run(_block(WITH_EMULATOR[1]).replace("8081", port), checkout)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)

    assert '"Status":200' in done.stdout.replace(" ", "") or '"Status": 200' in done.stdout
    assert "error_rate" in done.stdout
