"""S3 run-folder leases against a real S3 API (moto on 127.0.0.1): a store that ignores conditional
writes (If-None-Match / If-Match) is refused before it can let two runs hold one folder, and every
lease write is read back (a write whose object then holds someone else's lease is not ours).

The store that ignores conditions is moto behind a client that drops the condition headers; the
refusal comes from S3LeaseFile's own probe and read-back, against moto's answers.
"""

from __future__ import annotations

import json
import time

import pytest

from pipeline.training.lease import Lease, LeaseError, S3LeaseFile

pytestmark = pytest.mark.slow  # starts moto

RUN = "s3://bfn/ray/run"


@pytest.fixture
def s3():
    from tests.servers import aws_env, create_bucket, moto_s3

    with moto_s3() as endpoint, aws_env(endpoint):
        create_bucket(endpoint, "bfn")
        yield endpoint


class IgnoresConditions(S3LeaseFile):
    """A store that accepts If-None-Match / If-Match and ignores them (some S3-compatible stores do)."""

    def _put(self, data, key=None, **condition):
        return super()._put(data, **({"key": key} if key else {}))


class OverwrittenAfterPut(S3LeaseFile):
    """Another writer's lease lands right after ours (a store that acknowledged our write, then lost it)."""

    def _put(self, data, key=None, **condition):
        etag = super()._put(data, **({"key": key} if key else {}), **condition)
        if etag is not None and key is None:
            other = {"id": "other", "host": "elsewhere", "pid": 7, "started": 0, "heartbeat": time.time()}
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(other).encode())
        return etag


def test_a_store_that_ignores_conditional_writes_is_refused(s3):
    import boto3

    first = Lease(RUN)
    first.file = IgnoresConditions("bfn", first.file.key)
    with pytest.raises(LeaseError, match="ignores conditional writes"):
        first.acquire()
    second = Lease(RUN)
    second.file = IgnoresConditions("bfn", second.file.key)
    with pytest.raises(LeaseError, match="ignores conditional writes"):
        second.acquire()  # without the check both would hold the folder
    listed = boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket="bfn").get("Contents", [])
    assert listed == []  # refused before writing a lease; the probe is cleaned up
    with Lease(RUN) as lease:  # the same moto, conditions honoured: the lease works
        assert lease.file.read() is not None


def test_a_lease_write_is_read_back(s3):
    lease = Lease(RUN, stale_s=60)
    lease.file = OverwrittenAfterPut("bfn", lease.file.key)
    with pytest.raises(LeaseError, match="in use by another run: host elsewhere pid 7"):
        lease.acquire()  # our put succeeded, but the object holds another run's lease: not ours
