"""The network-shaping proxy of the pipeline benchmark measures up to its settings."""

from __future__ import annotations

import http.client
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
    """Every GET through the proxy waits the set first-byte latency, and a large one moves no faster than the set
    bandwidth. Lower bounds only: a loaded machine makes any call slower, never a shaped call faster (the
    benchmarks record the round trips they actually saw)."""
    s3 = moto_s3.client()
    s3.create_bucket(Bucket="shaping")
    s3.put_object(Bucket="shaping", Key="small", Body=b"x" * 100, ACL="public-read")
    s3.put_object(Bucket="shaping", Key="large", Body=b"y" * 8_000_000, ACL="public-read")
    proxied = http.client.HTTPConnection("127.0.0.1", shaped)
    _timed_get(proxied, "/shaping/small")  # warm up the keep-alive connection
    small = [_timed_get(proxied, "/shaping/small") for _ in range(5)]
    assert all(size == 100 for _, size in small)
    assert min(seconds for seconds, _ in small) >= 0.080, small

    seconds, size = _timed_get(proxied, "/shaping/large")
    assert size == 8_000_000
    burst = 0.05  # bench/shaping.py's token bucket may run 50 ms ahead after an idle spell
    assert seconds >= 0.080 + size / 20e6 - burst, f"8 MB in {seconds:.3f} s: faster than 20 MB/s"
    proxied.close()
