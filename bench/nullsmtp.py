"""The Python SMTP ceiling: an aiosmtpd server whose handler just answers 250.

    python -m bench.nullsmtp --listen 127.0.0.1:PORT

No storage, no replication: what aiosmtpd itself costs per message on this
machine, measured in the same run as mqnode so the ratio means something.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session


class NullHandler:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok: queued as NULL"


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(
        lambda: SMTP(NullHandler(), hostname="null.localdomain", enable_SMTPUTF8=True),
        host,
        port,
    )
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nullsmtp")
    ap.add_argument("--listen", required=True)
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    import logging

    logging.getLogger("mail.log").setLevel(logging.WARNING)
    asyncio.run(serve(host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
