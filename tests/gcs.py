"""A real GCS-protocol server on loopback for the object-storage tests.

``gcp-storage-emulator`` (from its own virtualenv, scripts/ensure_test_tools.sh)
serves the GCS JSON API; Beam's GCS filesystem and google-cloud-storage talk to it
through ``STORAGE_EMULATOR_HOST``. Credentials come the way they do in production,
from Application Default Credentials: a workforce-identity credentials file whose
token endpoint is a second loopback server here (standing in for Google's token
service, as the hub server of test_models stands in for tfhub.dev). Without them
Beam would retry Google's credential lookup for ~25 s in every process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import os
import pathlib
import subprocess
import threading
import time

import httpx

from tests.servers import free_port

TOOLS = pathlib.Path(os.environ.get("IMGEMBED_TOOLS", pathlib.Path(__file__).parent.parent / ".venv-tools"))
EMULATOR = TOOLS / "gcs" / "bin" / "gcp-storage-emulator"
PROJECT = "imgembed-test"


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"access_token": "test-token", "expires_in": 3600, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def credentials(token_url: str) -> dict:
    return {
        "type": "external_account_authorized_user",
        "audience": "//iam.googleapis.com/locations/global/workforcePools/test/providers/test",
        "refresh_token": "test",
        "token_url": token_url,
        "client_id": "test",
        "client_secret": "test",
        "quota_project_id": PROJECT,
    }


@dataclasses.dataclass(frozen=True)
class GcsServer:
    bucket: str
    env: dict[str, str]  # what a process needs to use it
    credentials_json: str

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])


@contextlib.contextmanager
def gcs_server(folder: pathlib.Path, bucket: str = "imgembed-test"):
    """Yields a GcsServer once the emulator answers; stops both servers afterwards."""
    token_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
    threading.Thread(target=token_server.serve_forever, daemon=True).start()
    port = free_port()
    # Its log goes to a file: a pipe nobody reads fills up and stalls the server.
    log = open(folder / "gcp-storage-emulator.log", "w")  # noqa: SIM115 - closed below
    emulator = subprocess.Popen(
        [str(EMULATOR), "start", "--host", "127.0.0.1", "--port", str(port)]
        + ["--default-bucket", bucket, "--in-memory"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if emulator.poll() is not None:
                raise RuntimeError(
                    f"gcp-storage-emulator exited: {pathlib.Path(log.name).read_text()[-2000:]}"
                )
            try:
                httpx.get(f"http://127.0.0.1:{port}/storage/v1/b", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("gcp-storage-emulator did not answer within 60 s") from None
                time.sleep(0.2)
        token_url = f"http://127.0.0.1:{token_server.server_address[1]}/token"
        credentials_json = json.dumps(credentials(token_url))
        credentials_file = folder / "application_default_credentials.json"
        credentials_file.write_text(credentials_json)
        env = {
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
            "GOOGLE_APPLICATION_CREDENTIALS": str(credentials_file),
            "GOOGLE_CLOUD_PROJECT": PROJECT,
        }
        yield GcsServer(bucket, env, credentials_json)
    finally:
        emulator.terminate()
        emulator.wait(timeout=30)
        log.close()
        token_server.shutdown()
