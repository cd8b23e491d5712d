"""The cluster the fan-out tests share, one per module: tests/cluster/harness.py on PostgreSQL, plus a
fresh bucket on the session's moto S3 server for the rounds' artifacts.

Without PostgreSQL the tests skip, or fail when SAO_REQUIRE_POSTGRES=1. The logs stay in pytest's
temporary folder (printed at the start).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.cluster.harness import PG_BIN, Cluster, local_cluster, s3_env


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not (PG_BIN / "initdb").exists():
        message = f"no PostgreSQL at {PG_BIN} (set SAO_POSTGRES_BIN)"
        if os.environ.get("SAO_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"SAO_REQUIRE_POSTGRES=1: {message}")
        pytest.skip(message)
    import s3fs

    logs = tmp_path_factory.mktemp("cluster-logs")
    print(f"\ncluster logs: {logs}", flush=True)
    bucket = f"sao-cluster-{uuid.uuid4().hex[:10]}"
    with pytest.MonkeyPatch.context() as mp:
        # This process reads the bucket too (sao_core.store.storage through s3fs).
        for key, value in s3_env(s3_endpoint).items():
            mp.setenv(key, value)
        for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            s3fs.S3FileSystem().mkdir(bucket)
            with local_cluster(logs, s3_endpoint, bucket=f"s3://{bucket}") as cluster:
                yield cluster
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
