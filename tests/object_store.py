"""An S3 endpoint for tests: moto's S3 server on a free local port, reached over real HTTP
by s3fs (in this process and in the pipeline's child processes)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3 server and the environment that points s3fs at it."""

    url: str

    @property
    def env(self) -> dict[str, str]:
        """What a child process needs: fsspec's per-protocol setting and dummy credentials."""
        return {
            **CREDENTIALS,
            "AWS_DEFAULT_REGION": "us-east-1",
            "FSSPEC_S3_ENDPOINT_URL": self.url,
        }

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.url,
            key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            use_listings_cache=False,
        )

    def new_bucket(self) -> str:
        name = f"bucket-{uuid.uuid4().hex[:10]}"
        self.filesystem().mkdir(name)
        return name


@contextmanager
def s3_server() -> Iterator[S3Endpoint]:
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Endpoint(f"http://{host}:{port}")
    finally:
        server.stop()
