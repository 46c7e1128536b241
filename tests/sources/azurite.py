"""Start Azurite's Blob service on 127.0.0.1 for tests, and stop it again.

Azurite is Microsoft's local Azure Storage emulator, installed from npm under
``.venv/node/node_modules``. It accepts the well-known development account below, which
Microsoft publishes for emulators and which grants nothing in Azure.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
AZURITE_BLOB = REPOSITORY / ".venv" / "node" / "node_modules" / ".bin" / "azurite-blob"
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
STARTUP_SECONDS = 30.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def connection_string(port: int) -> str:
    """Return the connection string of the development account on Azurite at ``port``."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{DEV_ACCOUNT};"
    )


@contextmanager
def running_azurite(workspace: Path) -> Iterator[str]:
    """Run Azurite's Blob service with its data in ``workspace``; yield its connection string.

    Telemetry is turned off so the emulator sends nothing off this machine.

    Raises:
        RuntimeError: Azurite is not installed, exited, or did not accept connections in
            ``STARTUP_SECONDS``.
    """
    if not AZURITE_BLOB.exists():
        raise RuntimeError(
            f"Azurite not found at {AZURITE_BLOB}; install it with "
            "`npm install --prefix .venv/node azurite`"
        )
    port = free_port()
    log_path = workspace / "azurite.log"
    command = [
        str(AZURITE_BLOB),
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--location",
        str(workspace),
        "--silent",
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_accepting(process, port, log_path)
        yield connection_string(port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_until_accepting(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log_path.read_text(encoding="utf-8", errors="replace")
            raise RuntimeError(f"Azurite exited with code {process.returncode}: {output[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"Azurite did not accept connections on port {port} in {STARTUP_SECONDS} s")
