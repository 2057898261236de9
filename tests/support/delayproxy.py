"""A user-space delaying TCP proxy (this kernel has no netem): NetLab.delay's tool.

Runs inside a node's namespace. iptables REDIRECTs the node's outgoing Raft
connections to `--port`; for each, the proxy reads the original destination
(SO_ORIGINAL_DST), connects there with `--mark` set on its socket (so its own
connection is not redirected again), and forwards both directions, holding
every chunk read for delay +- jitter (uniform, seeded) before writing it. A
chunk is never written before the one read before it: order is kept, and a
burst is spread no more than the jitter.

    python -m tests.support.delayproxy --port 7999 --delay-ms 25 --jitter-ms 5 --mark 0x6d71

Stops on SIGTERM. Bounded: at most `MAX_CONNECTIONS` at once, each buffering at
most what one read returns times the chunks in flight (a slow reader pauses
the writer's reads through TCP flow control of the awaited drain).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import struct

SO_ORIGINAL_DST = 80
MAX_CONNECTIONS = 64
READ_BYTES = 65536


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay_s: float,
    jitter_s: float,
    rng: random.Random,
) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=256)

    async def read() -> None:
        last_due = 0.0
        while True:
            data = await reader.read(READ_BYTES)
            due = max(loop.time() + delay_s + rng.uniform(-jitter_s, jitter_s), last_due)
            last_due = due
            await queue.put((due, data))
            if not data:
                return

    async def write() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(port: int, delay_s: float, jitter_s: float, seed: int, mark: int) -> None:
    rng = random.Random(seed)
    active = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        sock = writer.get_extra_info("socket")
        if active >= MAX_CONNECTIONS or sock is None:
            writer.close()
            return
        active += 1
        try:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port_, ip = struct.unpack_from("!2xH4s", raw)
            out = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            out.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            out.setblocking(False)
            try:
                await asyncio.wait_for(
                    asyncio.get_running_loop().sock_connect(out, (socket.inet_ntoa(ip), port_)),
                    5,
                )
            except (OSError, TimeoutError):
                out.close()
                writer.close()
                return
            up_r, up_w = await asyncio.open_connection(sock=out)
            await asyncio.gather(
                _pump(reader, up_w, delay_s, jitter_s, rng),
                _pump(up_r, writer, delay_s, jitter_s, rng),
            )
        finally:
            active -= 1

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(prog="delayproxy")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mark", type=lambda s: int(s, 0), required=True)
    a = p.parse_args()
    asyncio.run(serve(a.port, a.delay_ms / 1000, a.jitter_ms / 1000, a.seed, a.mark))


if __name__ == "__main__":
    main()
