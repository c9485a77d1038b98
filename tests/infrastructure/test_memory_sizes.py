"""Each function's MemorySize (in the translated template) is the one `make memory` measured and the reasoning in
bench/results/memory.md is about: a size changed without measuring again fails here, as does a function the
measurements leave out or whose peak memory leaves less than half its MemorySize free."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from local.stack import translate_template

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "memory.md"
PARAMETERS = {"InstanceCredentialsSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:credentials-AbCdEf"}
#: A row of the table bench/memory.py writes between its markers.
ROW = re.compile(
    r"^\| (?P<function>\w+Function) \| (?P<batch>[^|]+) \| (?P<peak>\d+) \|(?:[^|]*\|){3} (?P<size>\d+) \|"
)


def measured() -> list[dict[str, str]]:
    text = RESULTS.read_text(encoding="utf-8")
    table = text.split("<!-- memory.py: begin -->", 1)[1].split("<!-- memory.py: end -->", 1)[0]
    return [match.groupdict() for line in table.splitlines() if (match := ROW.match(line))]


@pytest.fixture(scope="module")
def memory_sizes() -> dict[str, int]:
    template = translate_template(ROOT / "template.yaml", PARAMETERS)
    return {
        logical_id: int(resource["Properties"].get("MemorySize", 128))
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] == "AWS::Lambda::Function"
    }


def test_every_function_was_measured_at_its_memory_size(memory_sizes: dict[str, int]) -> None:
    rows = measured()
    assert {row["function"] for row in rows} == set(memory_sizes)
    assert [row for row in rows if int(row["size"]) != memory_sizes[row["function"]]] == [], (
        "MemorySize changed since bench/results/memory.md was measured: run `make memory` and revise the reasoning"
    )


def test_every_measured_peak_leaves_half_the_memory_free(memory_sizes: dict[str, int]) -> None:
    # Lambda's own runtime client, larger profiles and pages than the benchmark's need room beside the peak.
    tight = [row for row in measured() if int(row["peak"]) * 2 > memory_sizes[row["function"]]]
    assert tight == []
