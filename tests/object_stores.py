"""Real-protocol object stores on 127.0.0.1 for the tests: moto's S3 server (its WSGI app,
under werkzeug, as moto's ThreadedMotoServer runs it) and gcp-storage-emulator for GCS.

The S3 server counts the body bytes of every GET answered, per access key id: each process
of a run gets its own key (moto accepts any), so the count is what that process fetched.
`fail_next(n, status)` answers the next n requests with `status` (429 / 503) before moto
sees them: the retries of the clients under test.
"""

from __future__ import annotations

import collections
import re
import socket
import threading

from werkzeug.serving import make_server

_KEY = re.compile(r"Credential=([^/]+)/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self):
        from moto.server import DomainDispatcherApplication, create_backend_app

        self.fetched: collections.Counter = collections.Counter()
        self.failures: list[int] = []
        self._app = DomainDispatcherApplication(create_backend_app)
        self._lock = threading.Lock()
        self._server = make_server("127.0.0.1", 0, self._count, threaded=True)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self.failures.extend([status] * n)

    def _count(self, environ, start_response):
        with self._lock:
            status = self.failures.pop(0) if self.failures else None
        if status is not None:
            start_response(f"{status} Unavailable", [("Content-Type", "application/xml"),
                                                     ("Retry-After", "0")])
            code = "SlowDown" if status == 503 else "TooManyRequests"
            return [f"<Error><Code>{code}</Code><Message>busy</Message></Error>".encode()]
        found = _KEY.search(environ.get("HTTP_AUTHORIZATION", ""))
        key = found[1] if found else "anonymous"
        counted = environ["REQUEST_METHOD"] == "GET"
        for part in self._app(environ, start_response):
            if counted:
                with self._lock:
                    self.fetched[key] += len(part)
            yield part

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()

    def env(self, key: str = "test-key") -> dict:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


class GcsServer:
    """gcp-storage-emulator keeping its objects in `data_dir`, so that a server started
    again on the same port (`restart`) serves what the stopped one held."""

    def __init__(self, data_dir, port: int | None = None, bucket: str | None = "cde-out"):
        from gcp_storage_emulator.server import create_server

        self.data_dir, self.port = str(data_dir), port or free_port()
        self._server = create_server("127.0.0.1", self.port, in_memory=False,
                                     default_bucket=bucket, data_dir=self.data_dir)
        self._server.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop()

    def restart(self) -> GcsServer:
        return GcsServer(self.data_dir, self.port, bucket=None)

    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": self.url}
