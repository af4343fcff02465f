"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import http.server
import threading

import pytest


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    requests: list[str] = []
    send_length = True

    def do_GET(self):  # noqa: N802 - the http.server hook
        type(self).requests.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if self.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_files(monkeypatch):
    """(handler class: put bytes into .files, read .requests; base URL) of a server on 127.0.0.1."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    handler = type("Handler", (_Files,), {"files": {}, "requests": [], "send_length": True})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
