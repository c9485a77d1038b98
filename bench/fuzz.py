"""``make fuzz``: the property-based tests of ``tests/fuzz`` with a large budget, their figures recorded.

Runs pytest under the Hypothesis ``fuzz`` profile (random inputs, ``FUZZ_EXAMPLES`` per property, default 2000;
the slow ones a quarter of it), saving every failing input to ``tests/fuzz/examples`` (commit it: ``make test``
replays it). Then it replaces the "Fuzz: last run" section of ``bench/RESULTS.md`` with the date, the machine,
the inputs given to each entry point and the outcome, and exits with pytest's status.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
HEADING = "### Fuzz: last run"
INTRO = (
    "## Fuzzing\n\n"
    "`make fuzz` (`bench/fuzz.py`): the properties of `tests/fuzz` with a large random budget; `make test` runs "
    "the same properties with 40 inputs each (fewer for the socket and moto ones), after replaying the examples "
    "database `tests/fuzz/examples`. The section below is the last run, recorded by the script; the defects the "
    "fuzzing found are listed after it.\n\n"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=int(os.environ.get("FUZZ_EXAMPLES", "2000")))
    parser.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        report_path = Path(folder) / "fuzz.json"
        env = {
            **os.environ,
            "HYPOTHESIS_PROFILE": "fuzz",
            "FUZZ_EXAMPLES": str(args.examples),
            "FUZZ_REPORT": str(report_path),
        }
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fuzz", "-rxXf"],
            cwd=REPO_ROOT,
            env=env,
            check=False,
            capture_output=True,
            text=True,
        )
        seconds = time.monotonic() - started
        report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else {"inputs": {}}
    summary = next((line for line in reversed(done.stdout.splitlines()) if " in " in line), "no summary")
    print(done.stdout[-4000:])
    if not args.no_record:
        record(section(report["inputs"], args.examples, seconds, summary.strip("= ")))
    return done.returncode


def section(inputs: dict[str, int], examples: int, seconds: float, summary: str) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"`{platform.system()} {platform.node()} {platform.release()} {platform.machine()}`"
    lines = [
        HEADING,
        "",
        f"{now} on {machine}, {os.cpu_count()} CPUs, Python {platform.python_version()}: {seconds:.0f} s. "
        f"Command: `make fuzz` ({examples} inputs per property). Outcome: {summary}.",
        "",
        "| entry point | inputs |",
        "|---|---:|",
        *(f"| {name} | {count:,} |" for name, count in sorted(inputs.items())),
        f"| **total** | **{sum(inputs.values()):,}** |",
        "",
    ]
    return "\n".join(lines)


def record(new: str) -> None:
    """Replace the last-run section (or add the Fuzzing part before the Soak part), leaving the rest as it is."""
    text = RESULTS.read_text(encoding="utf-8")
    start = text.find(HEADING)
    if start >= 0:
        end = min((i for i in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if i >= 0), default=-1)
        text = text[:start] + new + (text[end:] if end >= 0 else "")
    else:
        soak = text.find("## Soak")
        block = INTRO + new + "\n"
        text = text[:soak] + block + text[soak:] if soak >= 0 else text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
