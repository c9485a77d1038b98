"""``python -m local.emulator``: serve the User Service emulator on 127.0.0.1 until SIGINT/SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from types import FrameType

from jwt.warnings import InsecureKeyLengthWarning

from local.emulator.app import App
from local.emulator.faults import FaultConfigError, FaultInjector
from local.emulator.server import EmulatorServer
from local.emulator.settings import Settings, SettingsError, admin_json, instances_json, load_settings
from local.emulator.state import EmulatorState, RuntimeConfig
from local.emulator.tokens import TokenIssuer

HOST = "127.0.0.1"


def build_server(settings: Settings) -> EmulatorServer:
    """The server bound to ``HOST:settings.port`` (not yet serving); raises :class:`FaultConfigError`."""
    issuer = TokenIssuer(settings.jwt_secret)
    config = RuntimeConfig(
        token_lifetime_s=settings.token_lifetime_s,
        login_limit_per_minute=settings.login_limit_per_minute,
        login_block_s=settings.login_block_s,
    )
    state = EmulatorState(settings.instances, issuer, config, settings.admin)
    faults = FaultInjector(settings.faults)
    return EmulatorServer((HOST, settings.port), App(state, faults, issuer), verbose=settings.verbose)


def _stop(signum: int, frame: FrameType | None) -> None:
    # Once: a second SIGTERM (a parent that also terminates us) must not interrupt the shutdown itself.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _exit_when_stdin_closes() -> None:
    """Stop the server once stdin reaches EOF: a parent that starts us with a pipe (tests) and dies
    without cleaning up does not leave an orphan emulator behind."""

    def watch() -> None:
        while sys.stdin.buffer.read(4096):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    # A short EMULATOR_JWT_SECRET is the user's choice for a local tool: no need to warn on every token.
    warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv, os.environ)
        server = build_server(settings)
    except (SettingsError, FaultConfigError) as exc:
        print(f"emulator: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"emulator: cannot listen on {HOST}: {exc.strerror}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _stop)
    if os.environ.get("EMULATOR_EXIT_ON_STDIN_EOF") == "1":
        _exit_when_stdin_closes()
    try:
        # Inside the try: a parent may stop us as soon as it reads the "listening" line.
        if settings.instances_generated:
            print("instances: " + json.dumps(instances_json(settings.instances)), flush=True)
        if settings.admin_generated:
            print("admin: " + json.dumps(admin_json(settings.admin)), flush=True)
        print(settings.login_limit_line(), flush=True)
        print(f"listening on http://{HOST}:{server.port}", flush=True)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.server_close()
    with contextlib.suppress(OSError):
        print("emulator stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
