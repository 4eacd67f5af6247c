"""S3 helpers for integration tests against the ``moto_server`` fixture (tests/integration/conftest.py).

``S3_ENV`` holds the dummy credentials and region the fixture sets for the session;
``enforce_s3_auth(url)`` makes the server check credentials (so those dummy keys are rejected)
until the context exits.
"""

from __future__ import annotations

import contextlib
import urllib.request
from typing import Iterator

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def enforce_s3_auth(url: str) -> Iterator[None]:
    """Within the block the server checks signatures against its IAM users: unknown keys get 403."""
    def set_count(count: str) -> None:
        request = urllib.request.Request(f"{url}/moto-api/reset-auth", data=count.encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    set_count("0")
    try:
        yield
    finally:
        set_count("inf")
