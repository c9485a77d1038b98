"""The HTTP/1.1 front: a stdlib ThreadingHTTPServer with keep-alive and socket-level fault control."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from local.emulator.app import App
from local.emulator.messages import Reply, status_phrase

MAX_BODY_BYTES = 4 * 1024 * 1024


class BadRequestBody(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class EmulatorServer(ThreadingHTTPServer):
    """One thread per connection (daemon threads, so a hung request never blocks shutdown)."""

    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App, *, verbose: bool = False) -> None:
        self.app = app
        self.verbose = verbose
        super().__init__(address, EmulatorRequestHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class EmulatorRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "UserServiceEmulator/1.0"
    disable_nagle_algorithm = True
    timeout = 300  # an idle keep-alive connection is closed after this many seconds

    @property
    def emulator(self) -> EmulatorServer:
        return cast(EmulatorServer, self.server)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_GET
    do_PUT = do_GET
    do_DELETE = do_GET
    do_PATCH = do_GET
    do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
        except BadRequestBody as exc:
            self.close_connection = True
            self._send(Reply(exc.status, {"Result": None, "Status": exc.status, "Title": str(exc), "Errors": []}))
            return
        outcome = self.emulator.app.handle(
            self.command,
            self.path,
            dict(self.headers.items()),
            body,
            client_gone=self._client_gone,
            client_address=str(self.client_address[0]),
        )
        if outcome.drop or outcome.reply is None:
            self._drop()
        else:
            self._send(outcome.reply)

    def _read_body(self) -> bytes:
        """Read the whole body (so the next request on the connection starts in the right place)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
        except ValueError:
            raise BadRequestBody(400, "Invalid Content-Length") from None
        if length < 0:
            raise BadRequestBody(400, "Invalid Content-Length")
        if length > MAX_BODY_BYTES:
            raise BadRequestBody(413, "Request body too large")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                raise BadRequestBody(400, "Invalid chunked encoding") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers, up to the blank line
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise BadRequestBody(413, "Request body too large")
            chunks.append(self.rfile.read(size))
            self.rfile.readline(16)  # the CRLF after the chunk

    def _send(self, reply: Reply) -> None:
        body = json.dumps(reply.payload, separators=(",", ":")).encode("utf-8")
        lines = [
            f"{self.protocol_version} {reply.status} {status_phrase(reply.status)}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            "Content-Type: application/json; charset=utf-8",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in reply.headers.items()),
        ]
        if self.close_connection:
            lines.append("Connection: close")
        try:
            self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        except OSError:  # the client went away (e.g. timed out during a hang)
            self.close_connection = True
            return
        self.log_request(reply.status, len(body))

    def _drop(self) -> None:
        """Close the connection without writing a single byte of response."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        self.log_message('"%s" dropped without answer', self.requestline)

    def _client_gone(self) -> bool:
        """True when the peer has closed its side (checked without consuming anything)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            peeked: bytes = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True
        return peeked == b""

    def log_message(self, format: str, *args: Any) -> None:
        if self.emulator.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")
