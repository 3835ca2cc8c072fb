"""Shared pytest fixtures."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# --------------------------------------------------------------------------- S3 (moto)

# The fixture owns these for the whole session. The ones set to None are removed so a
# developer's own AWS setup (a profile, an S3-specific endpoint, which would win over
# AWS_ENDPOINT_URL) can never leak into the tests; /dev/null config files keep botocore from
# reading ~/.aws.
_S3_ENV_OVERRIDES = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ENDPOINT_URL_S3": None,
    "AWS_SESSION_TOKEN": None,
    "AWS_SECURITY_TOKEN": None,
    "AWS_PROFILE": None,
    "AWS_DEFAULT_PROFILE": None,
    "AWS_REGION": None,
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": None,
}


@dataclass
class S3Server:
    """moto's S3 protocol server, reachable from this process and any child (Ray workers)."""

    endpoint: str

    def client(self, service: str = "s3", **kwargs):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", **kwargs)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a fresh bucket and return its URL, ``s3://<name>``."""
        name = name or f"rf-test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


def _clear_fs_caches() -> None:
    # Filesystems created before the environment changed would keep the old endpoint and
    # credentials; both radforge's cache and fsspec's are keyed on options, not on env.
    import fsspec

    from radforge import storage

    storage.clear_cache()
    for cls in list(fsspec.registry.values()):  # each class keeps its own instance cache
        cls.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 endpoint on 127.0.0.1 (moto), with the standard AWS env pointing at it.

    The variables go into os.environ, not just into fsspec options, because a local Ray
    cluster started later inherits them for its worker processes.
    """
    from moto.server import ThreadedMotoServer

    werkzeug_log = logging.getLogger("werkzeug")
    old_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # one INFO line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"

    overrides = dict(_S3_ENV_OVERRIDES, AWS_ENDPOINT_URL=endpoint)
    saved = {k: os.environ.get(k) for k in overrides}
    for k, v in overrides.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _clear_fs_caches()
    try:
        yield S3Server(endpoint=endpoint)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_fs_caches()
        server.stop()
        werkzeug_log.setLevel(old_level)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket for this test: ``s3://<unique-name>``."""
    return s3_server.create_bucket()


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[str]:
    """One real local Ray cluster (2 CPUs) for the session; yields its address.

    It depends on `s3_server` so that the AWS environment is in place before Ray starts its
    workers: they inherit os.environ at start-up.
    """
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def deid_secret(monkeypatch) -> str:
    """A real (non-demo) pseudonym secret in the standard variable."""
    secret = "test-secret-" + "x" * 32
    monkeypatch.setenv("RADFORGE_DEID_SECRET", secret)
    return secret
