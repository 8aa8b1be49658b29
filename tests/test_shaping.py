"""The network-shaping proxy of the pipeline benchmark measures up to its settings."""

from __future__ import annotations

import http.client
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MotoS3, shaping_proxy

pytestmark = pytest.mark.s3


@pytest.fixture
def shaped(moto_s3: MotoS3) -> Iterator[int]:
    """A proxy with 80 ms first-byte latency and 20 MB/s per connection in front of moto."""
    with shaping_proxy(moto_s3.port, latency_ms=80, bandwidth_mbps=20) as port:
        yield port


def _timed_get(conn: http.client.HTTPConnection, path: str) -> tuple[float, int]:
    started = time.perf_counter()
    conn.request("GET", path)
    body = conn.getresponse().read()
    return time.perf_counter() - started, len(body)


def test_added_latency_and_bandwidth_cap(moto_s3: MotoS3, shaped: int, tmp_path: Path) -> None:
    """Small GETs take the set first-byte latency longer; a large GET moves at the set bandwidth."""
    s3 = moto_s3.client()
    s3.create_bucket(Bucket="shaping")
    s3.put_object(Bucket="shaping", Key="small", Body=b"x" * 100, ACL="public-read")
    s3.put_object(Bucket="shaping", Key="large", Body=b"y" * 8_000_000, ACL="public-read")
    direct = http.client.HTTPConnection("127.0.0.1", moto_s3.port)
    proxied = http.client.HTTPConnection("127.0.0.1", shaped)
    for conn in (direct, proxied):  # warm up each keep-alive connection
        _timed_get(conn, "/shaping/small")
    assert _timed_get(proxied, "/shaping/small")[1] == 100
    base = statistics.median(_timed_get(direct, "/shaping/small")[0] for _ in range(7))
    shaped_small = statistics.median(_timed_get(proxied, "/shaping/small")[0] for _ in range(7))
    added_ms = (shaped_small - base) * 1000
    assert 80 * 0.8 <= added_ms <= 80 * 1.2, f"added latency {added_ms:.1f} ms, set 80 ms"

    seconds, size = _timed_get(proxied, "/shaping/large")
    assert size == 8_000_000
    mbps = size / (seconds - 0.080) / 1e6
    assert 20 * 0.8 <= mbps <= 20 * 1.2, f"bandwidth {mbps:.1f} MB/s, set 20 MB/s"
    direct.close()
    proxied.close()
