"""A tiny HTTP file server on 127.0.0.1 with Range support and fault injection, for download tests.

Nothing in the test suite reaches the internet: downloads are pointed at this server.
"""

from __future__ import annotations

import http.server
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from m2dx_clinic import fetch as dl


# --------------------------------------------------------------------------------------------
# a tiny file server with Range support and fault injection


@dataclass
class ServerState:
    root: Path
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    drop_after: int | None = None  # cut the next response after this many body bytes (once)
    ignore_range: bool = False  # answer 200 with the whole file even to Range requests


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    state: ServerState  # set on the subclass made per server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        state = self.state
        range_header = self.headers.get("Range")
        name = self.path.split("?", 1)[0].lstrip("/")
        state.requests.append((name, range_header))
        path = state.root / name
        if not name or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        size = len(data)
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
        if m and not state.ignore_range:
            start = int(m.group(1))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = int(m.group(2)) if m.group(2) else size - 1
            data = data[start : end + 1]
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{size}")
        self.end_headers()
        if state.drop_after is not None:
            cut, state.drop_after = state.drop_after, None
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)


@dataclass
class LocalServer:
    url: str
    root: Path
    state: ServerState

    def put(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        return self.state.requests


@pytest.fixture
def http_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A ThreadingHTTPServer on 127.0.0.1:<free port> serving tmp_path/'served'."""
    monkeypatch.setattr(dl, "RETRY_SLEEP_S", 0.0)
    root = tmp_path / "served"
    root.mkdir()
    state = ServerState(root=root)
    handler = type("Handler", (_RangeHandler,), {"state": state})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield LocalServer(f"http://127.0.0.1:{server.server_address[1]}", root, state)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
