"""The built artifact (``sam build``'s ``.aws-sam/build``), run as Lambda runs it: each function in a fresh
interpreter of the runtime's Python that has nothing but boto3, with the function's folder and the layer first on
``sys.path``, its environment from the template (pointed at the local stack), and no bytecode written.

Used by the tests of the built artifact (``tests/artifact``) and the cold-start benchmark (``bench/cold_start.py``).

Example
-------
    artifact = BuiltArtifact(Path(".aws-sam/build"))
    report = artifact.run(
        "SignupFunction", runtime_python=Path(".venv-runtime/bin/python"), stack=stack, events=[event]
    )
    report["invocations"][0]["result"]        # {"status": "registered", "deviceToken": ..., "reason": None}
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import Any, Final

from local.stack import LocalStack, load_template

PROBE: Final = Path(__file__).resolve().with_name("lambda_probe.py")
LAYER_ID: Final = "SharedLibraryLayer"
#: Environment variables of the test process that must not reach the probe (they would add code to its path).
_NEVER_PASSED: Final = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")


class ArtifactError(RuntimeError):
    """The build folder is missing or incomplete, or a probe failed to run."""


def canonical_name(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class BuiltFunction:
    logical_id: str
    code_dir: Path
    handler: str
    memory: int
    timeout: int


class BuiltArtifact:
    """The functions and the layer of a ``sam build`` output folder, read from its ``template.yaml``."""

    def __init__(self, build_dir: Path) -> None:
        template_path = build_dir / "template.yaml"
        if not template_path.is_file():
            raise ArtifactError(f"{build_dir} holds no built template.yaml: run `make build` first")
        self.build_dir = build_dir = build_dir.absolute()
        template = load_template(template_path)
        resources: dict[str, Any] = template["Resources"]
        function_globals = (template.get("Globals") or {}).get("Function", {})
        self.layer_dir = build_dir / str(resources[LAYER_ID]["Properties"]["ContentUri"]) / "python"
        if not self.layer_dir.is_dir():
            raise ArtifactError(f"the built layer has no python folder: {self.layer_dir}")
        self.functions: dict[str, BuiltFunction] = {}
        for logical_id, resource in resources.items():
            if resource.get("Type") != "AWS::Serverless::Function":
                continue
            props = {**function_globals, **resource["Properties"]}
            self.functions[logical_id] = BuiltFunction(
                logical_id,
                code_dir=build_dir / str(props["CodeUri"]),
                handler=str(props["Handler"]),
                memory=int(props.get("MemorySize", 128)),
                timeout=int(props.get("Timeout", 3)),
            )

    def distributions(self) -> dict[str, str]:
        """Canonical name -> version of every distribution installed in the layer."""
        found: dict[str, str] = {}
        for metadata in self.layer_dir.glob("*.dist-info/METADATA"):
            headers = HeaderParser().parsestr(metadata.read_text(encoding="utf-8"))
            found[canonical_name(headers["Name"])] = headers["Version"]
        return found

    def read_only_copy(self, destination: Path) -> BuiltArtifact:
        """A copy whose files and folders have no write permission (Lambda's code folders are read-only)."""
        shutil.copytree(self.build_dir, destination, symlinks=True)
        for folder, dirs, files in os.walk(destination):
            for name in files:
                path = Path(folder, name)
                path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            Path(folder).chmod(0o555)
            del dirs  # walked top-down; the folder itself is made read-only after its files
        return BuiltArtifact(destination)

    def environment(self, logical_id: str, stack: LocalStack | None) -> dict[str, str]:
        """What Lambda would set for this function, its template variables resolved against the local stack."""
        function = self.functions[logical_id]
        base = {key: value for key, value in os.environ.items() if key in ("PATH", "LANG", "LC_ALL", "TZ", "HOME")}
        lambda_variables = {
            "LAMBDA_TASK_ROOT": str(function.code_dir),
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
            "_HANDLER": function.handler,
            # The code folders are read-only on Lambda: no bytecode is ever written, so only shipped .pyc help.
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
        }
        stack_variables = stack.function_environment(logical_id) if stack is not None else {}
        return {**base, **stack_variables, **lambda_variables}

    def run(
        self,
        logical_id: str,
        *,
        runtime_python: Path,
        stack: LocalStack | None,
        events: Sequence[Mapping[str, Any]] = (),
        overrides: Mapping[str, str] | None = None,
        setup: bool = True,
        timeout: float = 300,
    ) -> dict[str, Any]:
        """Import the function's handler in a fresh runtime interpreter and invoke it once per event."""
        function = self.functions[logical_id]
        plan = {
            "mode": "function",
            "function_dir": str(function.code_dir),
            "layer_dir": str(self.layer_dir),
            "handler": function.handler,
            "events": list(events),
            "memory": function.memory,
            "timeout": function.timeout,
            "setup": setup,
        }
        environment = self.environment(logical_id, stack) | dict(overrides or {})
        return run_probe(runtime_python, plan, environment, timeout=timeout)


def baseline(runtime_python: Path, environment: Mapping[str, str], *, timeout: float = 120) -> dict[str, Any]:
    """``import boto3`` and one client in a fresh runtime interpreter (what a cold start is compared with)."""
    return run_probe(runtime_python, {"mode": "baseline"}, environment, timeout=timeout)


def run_probe(
    runtime_python: Path, plan: Mapping[str, Any], environment: Mapping[str, str], *, timeout: float
) -> dict[str, Any]:
    """Run :data:`PROBE` with ``plan``; its JSON report (raises :class:`ArtifactError` when it did not run)."""
    if not runtime_python.is_file():
        raise ArtifactError(f"no runtime interpreter at {runtime_python}: run `make .venv-runtime/.installed`")
    env = {key: value for key, value in environment.items() if key not in _NEVER_PASSED}
    with tempfile.TemporaryDirectory(prefix="lambda-probe-") as scratch:
        plan_path, output = Path(scratch, "plan.json"), Path(scratch, "report.json")
        plan_path.write_text(json.dumps({**plan, "output": str(output)}), encoding="utf-8")
        # -P: the probe's own folder is not put on sys.path; the working directory is the scratch folder.
        completed = subprocess.run(
            # absolute(), not resolve(): a virtual environment's python is a symlink that must stay one.
            [str(runtime_python.absolute()), "-P", str(PROBE), str(plan_path)],
            env=env,
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if completed.returncode != 0 or not output.is_file():
            output_tail = f"{completed.stderr[-4000:]}\n{completed.stdout[-2000:]}"
            raise ArtifactError(f"the probe failed (exit {completed.returncode}):\n{output_tail}")
        report: dict[str, Any] = json.loads(output.read_text(encoding="utf-8"))
    report["stdout"] = completed.stdout
    return report
