"""What ships is what was tested: the layer's lock, the built layer and the test environment hold the same
distributions, one by one, and the built layer carries bytecode for the runtime's Python.

The lock (layers/telematics/requirements.txt) is generated from requirements.in by `make lock`; the checks of the
built layer need `sam build`'s output and run under `make test` (which sets TELEMATICS_BUILD_DIR), and are
skipped when pytest is run by hand without it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from local.artifact import BuiltArtifact, canonical_name

ROOT = Path(__file__).resolve().parents[2]
LAYER = ROOT / "layers" / "telematics"
LOCK = LAYER / "requirements.txt"
RUNTIME_PYTHON = (3, 12)
#: Names of test doubles; they live in local/ (fakes.py, fake_store.py), beside the tests and the local stack.
TEST_DOUBLE = re.compile(r"^(Fake|InMemory|Recording)[A-Z]")
#: Doubles still in a shipped module, each with why (none).
SHIPPED_DOUBLES: dict[str, str] = {}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")


def pins(path: Path) -> dict[str, str]:
    """Canonical name -> pinned version of a requirements file (comments, hashes and options skipped)."""
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line.strip())
        if match:
            found[canonical_name(match.group(1))] = match.group(3)
    return found


def hashed_entries(path: Path) -> dict[str, int]:
    """Canonical name -> number of ``--hash`` options of each entry of a pip lock."""
    counts: dict[str, int] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line.strip())
        if match:
            current = canonical_name(match.group(1))
            counts[current] = 0
        if current is not None:
            counts[current] += line.count("--hash=sha256:")
    return counts


@pytest.fixture(scope="module")
def built() -> BuiltArtifact:
    build_dir = os.environ.get("TELEMATICS_BUILD_DIR")
    if not build_dir:
        pytest.skip("needs sam build's output: run `make test` or `make build artifact`")
    return BuiltArtifact(Path(build_dir))


# ------------------------------------------------------------------------------------------------ the lock


def test_the_lock_pins_every_direct_dependency_at_the_version_asked_for() -> None:
    locked = pins(LOCK)
    wanted = pins(LAYER / "requirements.in")
    assert wanted, "requirements.in names no pinned dependency"
    assert {name: locked.get(name) for name in wanted} == wanted


def test_every_locked_distribution_is_pinned_with_a_hash() -> None:
    entries = hashed_entries(LOCK)
    assert entries
    assert {name for name, count in entries.items() if count == 0} == set()


def test_the_lock_holds_boto3_and_botocore_together_and_no_xray_sdk() -> None:
    locked = pins(LOCK)
    # Both ship (they shadow the runtime's pair) or neither; the X-Ray SDK is not used (README: traces).
    assert {"boto3", "botocore", "s3transfer"} <= set(locked)
    assert "aws-xray-sdk" not in locked


def test_the_tools_constraints_and_the_runtime_stand_in_agree_with_the_lock() -> None:
    locked = pins(LOCK)
    for other in (ROOT / "requirements" / "constraints.txt", ROOT / "requirements" / "runtime.txt"):
        shared = pins(other).keys() & locked.keys()
        assert shared, other
        assert {name: pins(other)[name] for name in shared} == {name: locked[name] for name in shared}, other


def test_the_test_environment_runs_the_locked_versions() -> None:
    mismatches = {
        name: (version, _installed(name)) for name, version in pins(LOCK).items() if _installed(name) != version
    }
    assert mismatches == {}, "name: (locked, installed); run `make venv`"


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_the_tests_run_on_the_runtimes_python() -> None:
    assert sys.version_info[:2] == RUNTIME_PYTHON


# ------------------------------------------------------------------------------------------------ the built layer


def test_the_built_layer_holds_exactly_the_locked_distributions(built: BuiltArtifact) -> None:
    assert built.distributions() == pins(LOCK)


def test_the_built_layer_matches_the_test_environment_one_by_one(built: BuiltArtifact) -> None:
    shipped = built.distributions()
    assert shipped
    differences = {
        name: (version, _installed(name)) for name, version in shipped.items() if _installed(name) != version
    }
    assert differences == {}, "name: (in the layer, in the test environment)"


def test_every_module_of_the_layer_ships_unchecked_bytecode_for_the_runtime(built: BuiltArtifact) -> None:
    sources = list(built.layer_dir.rglob("*.py"))
    assert len(sources) > 100
    missing, checked = [], []
    for source in sources:
        compiled = Path(importlib.util.cache_from_source(str(source)))
        if not compiled.is_file():
            missing.append(str(source.relative_to(built.layer_dir)))
            continue
        header = compiled.read_bytes()[:8]
        # PEP 552: the magic number of this (the runtime's) Python, then flags 0b01 = hash-based, not checked
        # against the source (a zip may not keep file times; Lambda's folders never change).
        if header[:4] != importlib.util.MAGIC_NUMBER or int.from_bytes(header[4:8], "little") != 0b01:
            checked.append(str(source.relative_to(built.layer_dir)))
    assert missing == []
    assert checked == []


def test_the_built_layer_carries_the_library_as_in_the_repository(built: BuiltArtifact) -> None:
    library = built.layer_dir / "telematics_reg"
    shipped = {p.name for p in library.glob("*.py")}
    assert shipped == {p.name for p in (LAYER / "telematics_reg").glob("*.py")}
    assert not (built.layer_dir / "bin").exists()


def _doubles(library: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for source in library.rglob("*.py"):
        if source.stem.startswith("fake"):
            found[source.stem] = str(source)
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and TEST_DOUBLE.match(node.name) and node.name not in SHIPPED_DOUBLES:
                found[node.name] = str(source)
    return found


def test_no_test_double_is_in_the_library() -> None:
    assert _doubles(LAYER / "telematics_reg") == {}


def test_no_test_double_ships_in_the_built_layer(built: BuiltArtifact) -> None:
    assert _doubles(built.layer_dir / "telematics_reg") == {}
