"""The Python SMTP ceiling: an aiosmtpd server whose handler just answers 250.

    python -m bench.nullsmtp --listen 127.0.0.1:PORT [--count-file PATH] [--uvloop]

No storage, no replication: what aiosmtpd itself costs per message on this
machine, measured in the same run as mqnode so the ratio means something.
It doubles as the end-to-end sink: with `--count-file` it rewrites PATH
(atomically, every 50 ms while the count changes) with "messages recipients
first_s last_s", the wall-clock times of the first and last message.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

COUNT_EVERY_S = 0.05


class NullHandler:
    def __init__(self) -> None:
        self.messages = 0
        self.recipients = 0
        self.first_s = 0.0
        self.last_s = 0.0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.time()
        if not self.messages:
            self.first_s = now
        self.messages += 1
        self.recipients += len(envelope.rcpt_tos)
        self.last_s = now
        return "250 2.0.0 Ok: queued as NULL"


async def write_counts(handler: NullHandler, path: Path, stop: asyncio.Event) -> None:
    written = -1
    while not stop.is_set():
        if handler.messages != written:
            written = handler.messages
            tmp = path.with_suffix(".tmp")
            tmp.write_text(
                f"{handler.messages} {handler.recipients} {handler.first_s} {handler.last_s}\n"
            )
            os.replace(tmp, path)
        try:
            await asyncio.wait_for(stop.wait(), COUNT_EVERY_S)
        except TimeoutError:
            pass


async def serve(host: str, port: int, count_file: Path | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    handler = NullHandler()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="null.localdomain", enable_SMTPUTF8=True),
        host,
        port,
    )
    counter = None
    if count_file is not None:
        counter = asyncio.create_task(write_counts(handler, count_file, stop))
    await stop.wait()
    server.close()
    await server.wait_closed()
    if counter is not None:
        await counter


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nullsmtp")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--count-file", type=Path)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop, as mqnode does")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    if args.uvloop:
        import uvloop

        uvloop.run(serve(host, int(port), args.count_file))
    else:
        asyncio.run(serve(host, int(port), args.count_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
