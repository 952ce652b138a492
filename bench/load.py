"""A lean load generator for measuring a server's ceiling: ``python -m bench.load PORT C SECONDS``.

C keep-alive connections on one asyncio loop, each sending the run call and reading the answer
back to back; prints the number of answers. Far cheaper per request than requests, so what it
reaches is (a lower bound of) what the server can take.
"""

from __future__ import annotations

import asyncio
import sys
import time

REQUEST = (
    b"POST /v7/tests/1001/run HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n"
    b"Authorization: Bearer bench\r\nContent-Length: 0\r\n\r\n"
)


async def _client(port: int, until: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < until:
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            counts[0] += 1
    finally:
        writer.close()


async def _main(port: int, connections: int, seconds: float) -> int:
    counts = [0]
    until = time.monotonic() + seconds
    await asyncio.gather(*(_client(port, until, counts) for _ in range(connections)))
    return counts[0]


def main() -> None:
    port, connections, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    print(asyncio.run(_main(port, connections, seconds)))


if __name__ == "__main__":
    main()
