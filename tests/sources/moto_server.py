"""A moto S3 server on 127.0.0.1 for the AWS source tests, and the environment boto3 needs.

The server runs in a thread of the test process, on a port the operating system picks. A test
module imports the fixture functions; pytest registers them under the names ``aws_env``,
``moto_server`` and ``moto_endpoint``. The ``aws_env`` fixture gives boto3 dummy credentials and turns off the instance metadata lookup,
so no test can reach a real AWS endpoint or the metadata address.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

__all__ = ["aws_env_fixture", "moto_endpoint_fixture", "moto_server_fixture", "reset_moto"]

# AWS settings from the developer's environment that would send boto3 elsewhere.
_CLEARED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_CLOUDTRAIL",
    "AWS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
)


@pytest.fixture(name="aws_env")
def aws_env_fixture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Give boto3 dummy credentials and no config files, metadata lookup or proxies."""
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.fixture(name="moto_server", scope="module")
def moto_server_fixture() -> Iterator[str]:
    """Start moto's server on 127.0.0.1 for one test module; yield its endpoint URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def reset_moto(endpoint: str) -> None:
    """Delete every bucket and object the server holds."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


@pytest.fixture(name="moto_endpoint")
def moto_endpoint_fixture(moto_server: str, aws_env: None) -> str:
    """Return the endpoint of an emptied moto server, with the dummy AWS environment set."""
    reset_moto(moto_server)
    return moto_server
