"""A TCP proxy that makes a loopback S3 server (moto) behave like cloud object storage.

For every connection it forwards bytes both ways, and shapes them as S3 behaves from a client's
side, with defaults from AWS's own guidance ("Performance design patterns for Amazon S3" and
"Best practices design patterns: optimizing Amazon S3 performance"):

* first-byte latency: each request's response starts ``--latency-ms`` after the request's last
  byte arrived (AWS: small-object and first-byte latencies of roughly 100-200 ms; default 100);
* per-connection bandwidth: each connection moves at most ``--bandwidth-mbps`` megabytes per
  second in each direction (AWS: plan one concurrent request per 85-90 MB/s; default 90);
* jitter: each request's latency is multiplied by a log-normal factor with sigma ``--jitter``
  (median 1; default 0, none), for the long tail cloud users see.

    python bench/shaping.py --upstream 127.0.0.1:5000 --port 0      # prints {"port": N} when ready
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Shape:
    latency_ms: float = 100.0
    bandwidth_mbps: float = 90.0  # megabytes (10^6 bytes) per second per connection and direction
    jitter: float = 0.0
    seed: int = 0


class _Bucket:
    """A token bucket: ``take(n)`` returns when n bytes may pass at the configured rate.

    It may run up to ``burst`` seconds ahead after an idle spell, which also repays the time
    every sleep oversleeps (else the rate would fall short of the setting under load).
    """

    def __init__(self, rate: float, burst: float = 0.05) -> None:
        self.rate = rate
        self.burst = burst
        self.next_free = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        start = max(now - self.burst, self.next_free)
        self.next_free = start + n / self.rate
        if self.next_free - now > 0.001:
            await asyncio.sleep(self.next_free - now)


async def _pipe_requests(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    bucket: _Bucket,
    requested: asyncio.Event,
    last_request: list[float],
) -> None:
    while data := await reader.read(CHUNK):
        await bucket.take(len(data))
        writer.write(data)
        await writer.drain()
        last_request[0] = time.monotonic()
        requested.set()
    writer.close()


async def _pipe_responses(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    bucket: _Bucket,
    requested: asyncio.Event,
    last_request: list[float],
    shape: Shape,
    rng: random.Random,
) -> None:
    while data := await reader.read(CHUNK):
        if requested.is_set():  # the first bytes of a response: hold them for the first-byte latency
            requested.clear()
            factor = rng.lognormvariate(0.0, shape.jitter) if shape.jitter > 0 else 1.0
            due = last_request[0] + shape.latency_ms / 1000.0 * factor
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
        await bucket.take(len(data))
        writer.write(data)
        await writer.drain()
    writer.close()


async def serve(
    upstream_host: str, upstream_port: int, shape: Shape, port: int = 0, ready: asyncio.Future[int] | None = None
) -> None:
    rng = random.Random(shape.seed)
    rate = shape.bandwidth_mbps * 1e6

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(upstream_host, upstream_port)
        except OSError:
            client_w.close()
            return
        requested = asyncio.Event()
        last_request = [time.monotonic()]
        tasks = [
            asyncio.create_task(_pipe_requests(client_r, up_w, _Bucket(rate), requested, last_request)),
            asyncio.create_task(_pipe_responses(up_r, client_w, _Bucket(rate), requested, last_request, shape, rng)),
        ]
        try:
            await asyncio.gather(*tasks)
        except (ConnectionError, OSError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            client_w.close()
            up_w.close()

    async def exit_with_parent(parent: int) -> None:
        # A benchmark killed outright cannot stop its proxy: notice the orphaning and exit.
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        server.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    watch = asyncio.create_task(exit_with_parent(os.getppid()))
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready.set_result(bound)
    else:
        print(json.dumps({"port": bound, **asdict(shape)}), flush=True)
    async with server:
        with contextlib.suppress(asyncio.CancelledError):
            await server.serve_forever()
    watch.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the S3 server to shape")
    parser.add_argument("--port", type=int, default=0, help="port to listen on, 0 for any (default: %(default)s)")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=Shape.latency_ms,
        help="first-byte latency per request (default: %(default)s)",
    )
    parser.add_argument(
        "--bandwidth-mbps",
        type=float,
        default=Shape.bandwidth_mbps,
        help="MB/s per connection and direction, 0 for unlimited (default: %(default)s)",
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=Shape.jitter,
        help="sigma of the log-normal latency factor, 0 for none (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="jitter seed (default: %(default)s)")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    shape = Shape(args.latency_ms, args.bandwidth_mbps, args.jitter, args.seed)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host or "127.0.0.1", int(port), shape, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
