"""Hypothesis profiles of the property-based tests, and the count of inputs each entry point was given.

``HYPOTHESIS_PROFILE`` picks the profile:

* ``ci`` (the default, what ``make test`` runs): a bounded number of inputs per property; first it replays the
  examples database kept in ``tests/fuzz/examples`` (read-only: a test run never changes the repository), then
  random inputs. A failure prints the blob that reproduces it (``@reproduce_failure``): add it as an ``@example``;
* ``fuzz`` (``make fuzz``): many more inputs, random, and every failing input found is saved to that database
  and kept there once fixed (commit it: the ``ci`` profile replays it from then on).

``FUZZ_REPORT=PATH`` writes, at the end of the session, how many inputs each entry point was given (JSON).
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase, ReadOnlyDatabase

EXAMPLES_DB = Path(__file__).resolve().parent / "examples"


class KeepingDatabase(ExampleDatabase):
    """The examples database for ``make fuzz``: saves every failing input found and never forgets one.

    Hypothesis deletes a saved example once it passes; here a fixed defect's input stays, and every later run
    replays it (the explicit ``@example`` of each fix is the regression that survives edits of the test: saved
    inputs are keyed by the test's source).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._directory = DirectoryBasedExampleDatabase(path)

    def save(self, key: bytes, value: bytes) -> None:
        self._directory.save(key, value)

    def fetch(self, key: bytes) -> Iterator[bytes]:
        yield from self._directory.fetch(key)

    def delete(self, key: bytes, value: bytes) -> None:
        pass  # kept on purpose (see the class docstring)


_COMMON = {
    # The machine is shared and the handlers do real work: time limits per input would only make runs flaky.
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    "print_blob": True,
}
settings.register_profile(
    "ci",
    max_examples=40,
    database=ReadOnlyDatabase(DirectoryBasedExampleDatabase(EXAMPLES_DB)),
    **_COMMON,
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "2000")),
    database=KeepingDatabase(EXAMPLES_DB),
    **_COMMON,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def scaled(ci_examples: int) -> int:
    """Inputs for a property: ``ci_examples`` under the ``ci`` profile, the profile's budget otherwise.

    The slow properties (a server, moto) take fewer inputs than the default under ``ci``.
    """
    budget = settings().max_examples
    return ci_examples if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci" else max(ci_examples, budget // 4)


class InputCounter:
    """Inputs given to each entry point (Hypothesis' generated and replayed examples, explicit ones too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def __call__(self, entry_point: str, n: int = 1) -> None:
        with self._lock:
            self.counts[entry_point] += n


INPUTS = InputCounter()


@pytest.fixture(scope="session", autouse=True)
def _fuzz_report() -> Iterator[None]:
    yield
    path = os.environ.get("FUZZ_REPORT")
    if path:
        report = {
            "profile": os.environ.get("HYPOTHESIS_PROFILE", "ci"),
            "inputs": dict(sorted(INPUTS.counts.items())),
        }
        Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
