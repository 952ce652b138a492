"""The local API servers the benchmarks call, each in its own process so it never shares a GIL.

* ``fast``: a minimal asyncio HTTP/1.1 server answering every request 200 with both rate-limit
  header sets (limits of 10**9), so neither side is ever limited and the server costs little;
* ``sim``: te-scheduler's own :class:`~scheduler.api.simulator.Simulator` (threads, real buckets,
  429s, failure rate), with every answer's status recorded.

Run as ``python -m bench.server --mode fast|sim --records FILE``; it prints ``PORT <n>`` once
listening and writes ``[received_at, test_id, status, from_te]`` rows to FILE on SIGTERM.
:class:`Server` starts and stops it from the benchmark process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.common import env, sample

Record = list[Any]  # [received_at (epoch s), test_id, status, from_te]
HUGE = 10**9


class _FastProtocol(asyncio.Protocol):
    """Keep-alive HTTP/1.1: every complete request head gets the canned 200."""

    def __init__(self, records: list[Record], announce: str | None) -> None:
        self.records = records
        self.announce = announce
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            skip = _content_length(head)
            if len(self.buffer) < end + 4 + skip:
                return  # the body has not all arrived
            self.buffer = self.buffer[end + 4 + skip :]
            now = time.time()
            path = head.split(b" ", 2)[1].decode("latin-1")
            test = _test_id(path)
            self.records.append([now, test, 200, b"te-scheduler/" in head])
            if self.announce and not _Announced.done and test.startswith(self.announce):
                print(f"HIT {now!r} {test}", flush=True)  # the parent waits for this line
                _Announced.done = True
            assert self.transport is not None
            self.transport.write(_canned(now))


class _Announced:
    done = False


_CANNED: dict[int, bytes] = {}


def _canned(now: float) -> bytes:
    """The 200 answer; its Reset header moves with the second, so it is cached per second."""
    second = int(now)
    answer = _CANNED.get(second)
    if answer is None:
        reset = second + 60
        rate = "".join(
            f"{prefix}-Limit: {HUGE}\r\n{prefix}-Remaining: {HUGE}\r\n{prefix}-Reset: {reset}\r\n"
            for prefix in ("X-Organization-Rate-Limit", "X-Instant-Test-Rate-Limit")
        )
        answer = f"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n{rate}\r\n".encode()
        _CANNED.clear()
        _CANNED[second] = answer
    return answer


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            try:
                return int(line[15:].strip() or 0)
            except ValueError:
                return 0
    return 0


def _test_id(path: str) -> str:
    parts = path.split("?", 1)[0].strip("/").split("/")
    return parts[-2] if len(parts) >= 2 else path


def _serve_fast(records: list[Record], stop: threading.Event, announce: str | None) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _FastProtocol(records, announce), "127.0.0.1", 0, backlog=4096
        )
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        server.close()

    asyncio.run(main())


def _serve_sim(args: argparse.Namespace, records: list[Record], stop: threading.Event) -> None:
    from scheduler.api.simulator import ReceivedRequest, Simulator, _Answer

    class RecordingSimulator(Simulator):
        """The product's simulator, noting each answer's status (and forgetting the request)."""

        def _answer(self, request: ReceivedRequest) -> _Answer:
            answer = super()._answer(request)
            self.requests.clear()  # the soak sends tens of thousands; the records suffice
            agent = request.header("User-Agent") or ""
            test = _test_id(request.path)
            records.append([request.received_at, test, answer.status, agent.startswith("te-")])
            return answer

    sim = RecordingSimulator(
        org_limit=args.org_limit,
        instant_limit=args.instant_limit,
        window=args.window,
        fail_rate=args.fail_rate,
        seed=args.seed,
    ).start()
    print(f"PORT {sim.port}", flush=True)
    stop.wait()
    sim.stop()


def main() -> None:
    """The server process."""
    parser = argparse.ArgumentParser(prog="python -m bench.server")
    parser.add_argument("--mode", choices=("fast", "sim"), default="fast")
    parser.add_argument("--records", required=True)
    parser.add_argument("--org-limit", type=int, default=HUGE)
    parser.add_argument("--instant-limit", type=int, default=HUGE)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--announce",
        default=None,
        help="Print 'HIT <time> <test>' at the first call of a test id "
        "starting with this (fast mode).",
    )
    args = parser.parse_args()
    records: list[Record] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.mode == "fast":
        _serve_fast(records, stop, args.announce)
    else:
        _serve_sim(args, records, stop)
    Path(args.records).write_text(json.dumps(records))


class Server:
    """A server process for one measurement: ``with Server(workdir, "x") as s: s.url``."""

    def __init__(self, workdir: Path, name: str, mode: str = "fast", **limits: Any) -> None:
        self.records_path = workdir / f"{name}.server.json"
        args = [
            sys.executable,
            "-m",
            "bench.server",
            "--mode",
            mode,
            "--records",
            str(self.records_path),
        ]
        for key, value in limits.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"bench server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}/v7"
        self.records: list[Record] = []
        self._lines: queue.Queue[str] | None = None  # the server's stdout, once read
        self._cpu_start = sample(self.proc.pid).cpu
        self._wall_start = time.monotonic()
        self.cpu = math.nan  # CPU seconds the server used while open
        self.busy = math.nan  # that, as a share of one core over the time it was open

    def wait_announce(self, timeout: float) -> tuple[float, str] | None:
        """The time and test id of the announced call (see ``--announce``), or None."""
        if self._lines is None:
            self._lines = queue.Queue()
            threading.Thread(target=self._read_lines, daemon=True).start()
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if not line.startswith("HIT "):
            return None
        _, at, test = line.split()
        return float(at), test

    def _read_lines(self) -> None:
        assert self.proc.stdout is not None and self._lines is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def cpu_now(self) -> float:
        """The server's CPU seconds so far (for its share during one measured interval)."""
        return sample(self.proc.pid).cpu

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> list[Record]:
        """Stop the server and load what it received."""
        if self.proc.poll() is None:
            self.cpu = sample(self.proc.pid).cpu - self._cpu_start
            self.busy = self.cpu / max(1e-9, time.monotonic() - self._wall_start)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.records_path.exists():
                self.records = json.loads(self.records_path.read_text())
        return self.records


if __name__ == "__main__":
    main()
