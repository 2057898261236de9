"""devsink: a recording SMTP sink for demos, tests and benchmarks.

Why it exists: mqnode's delivery path needs somewhere real to deliver to on
loopback, and tests need to *join* what mqnode acknowledged with what arrived
(exactly once, intact). devsink is that somewhere: it accepts every message
and appends one JSON line per message to a file, so a checker can read the
file while the sink is still running.

    mqnode dev-sink [--listen 127.0.0.1:2600] [--out devsink.jsonl] [--fail-rate 0]
    (or python -m mqnode.devtools.devsink with the same flags)

Line format (flushed per message):
    {"mail_from", "rcpts", "message_id", "size", "sha256", "received_ms", "peer"}
("peer" is the client's address:port, so one line per SMTP session shows reuse)

`--fail-rate R` answers `451 4.3.0` to a fraction R of messages (nothing is
recorded for those), to exercise retries. Stops cleanly on SIGTERM/SIGINT.
Limits: no TLS, no AUTH; messages up to `--max-message-bytes` (default 64 MiB).
Not part of the node: devsink imports nothing of mqnode but its clock.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import signal
import sys
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import IO, Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mqnode.clock import Clock, SystemClock

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def read_sink(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record in a devsink file (a torn last line is ignored)."""
    records: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # the sink is mid-write; the rest comes later
                records.append(json.loads(line))
    except FileNotFoundError:
        return []
    return records


def _message_id(content: bytes) -> str:
    headers = BytesHeaderParser().parsebytes(content)
    value = headers.get("Message-ID", "")
    return str(value).strip()


class RecordingHandler:
    """aiosmtpd handler: accept every envelope, record it, answer 250 (or a simulated 451)."""

    def __init__(self, out: IO[str], fail_rate: float, rng: random.Random, clock: Clock) -> None:
        self._out = out
        self._clock = clock
        self._fail_rate = fail_rate
        self._rng = rng
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self._fail_rate > 0 and self._rng.random() < self._fail_rate:
            return "451 4.3.0 devsink: simulated temporary failure"
        content = envelope.original_content or b""
        record = {
            "mail_from": envelope.mail_from,
            "rcpts": list(envelope.rcpt_tos),
            "message_id": _message_id(content),
            "size": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
            "received_ms": self._clock.wall_ms(),
            "peer": f"{session.peer[0]}:{session.peer[1]}" if session.peer else "",
        }
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._out.flush()
        self.count += 1
        return "250 2.0.0 Ok: recorded"


async def serve(
    host: str, port: int, out_path: Path, fail_rate: float, max_bytes: int, seed: int | None
) -> int:
    """Run until SIGTERM/SIGINT; return the number of messages recorded."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with open(out_path, "a", encoding="utf-8") as out:
        handler = RecordingHandler(out, fail_rate, random.Random(seed), SystemClock())
        server = await loop.create_server(
            lambda: SMTP(
                handler,
                data_size_limit=max_bytes,
                hostname="devsink.localdomain",
                timeout=60,
                loop=loop,
            ),
            host=host,
            port=port,
        )
        print(f"devsink listening on {host}:{port}, writing {out_path}", file=sys.stderr)
        await stop.wait()
        server.close()
        await server.wait_closed()
        return handler.count


DEFAULT_LISTEN = "127.0.0.1:2600"  # the relay host of the README's three-node example
DEFAULT_OUT = "devsink.jsonl"


def _parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description="A local SMTP sink that accepts every message and records one JSON line "
        "per message (sender, recipients, Message-ID, size, SHA-256), for trying mqnode "
        "without a real mail server: run the nodes with --relay-host at its address.",
    )
    p.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT to accept SMTP on ({DEFAULT_LISTEN})"
    )
    p.add_argument(
        "--out", default=DEFAULT_OUT, help=f"JSON-lines file to append records to ({DEFAULT_OUT})"
    )
    p.add_argument("--fail-rate", type=float, default=0.0, help="fraction answered 451 (0..1)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    p.add_argument("--seed", type=int, default=None, help="seed for --fail-rate choices")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "python -m mqnode.devtools.devsink") -> int:
    args = _parse_args(argv, prog)
    host, sep, port_s = str(args.listen).rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        print(f"devsink: --listen: expected HOST:PORT, got {args.listen!r}", file=sys.stderr)
        return 2
    if not 0.0 <= args.fail_rate <= 1.0:
        print("devsink: --fail-rate: must be between 0 and 1", file=sys.stderr)
        return 2
    if args.max_message_bytes <= 0:
        print("devsink: --max-message-bytes: must be > 0", file=sys.stderr)
        return 2
    try:
        count = asyncio.run(
            serve(
                host.strip("[]"),
                int(port_s),
                Path(args.out),
                args.fail_rate,
                args.max_message_bytes,
                args.seed,
            )
        )
    except OSError as exc:
        print(f"devsink: cannot listen on {args.listen}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"devsink: stopped after {count} messages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
