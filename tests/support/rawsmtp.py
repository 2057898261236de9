"""A raw SMTP socket for tests that must send what smtplib never would.

Pipelined bursts, over-long lines, 8-bit bytes, sessions cut off half-way,
and a client bound to a chosen loopback source address (127.0.0.2 is a
different client from 127.0.0.1 as far as the node can tell).

Every read is bounded by a deadline; on timeout the helpers return what they
have so far and say so (`timed_out`), they never hang.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"


@dataclass
class RawSmtp:
    sock: socket.socket
    buf: bytes = b""
    eof: bool = False
    timed_out: bool = False
    lines: list[str] = field(default_factory=list)  # every reply line read so far

    @classmethod
    def connect(cls, port: int, source: str = HOST, timeout_s: float = 10.0) -> RawSmtp:
        sock = socket.create_connection((HOST, port), timeout=timeout_s, source_address=(source, 0))
        return cls(sock)

    def __enter__(self) -> RawSmtp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> bool:
        """Send all of `data`; False if the node has closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def _fill(self, deadline: float) -> bool:
        """Read more bytes into the buffer; False on EOF, error or deadline."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.timed_out = True
            return False
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            self.timed_out = True
            return False
        except OSError:
            self.eof = True
            return False
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _line(self, deadline: float) -> str | None:
        while b"\r\n" not in self.buf:
            if not self._fill(deadline):
                return None
        raw, _, self.buf = self.buf.partition(b"\r\n")
        line = raw.decode("utf-8", "replace")
        self.lines.append(line)
        return line

    def reply(self, timeout_s: float = 10.0) -> tuple[int, str]:
        """The next complete reply (multi-line joined by newlines); (-1, text) if none came."""
        deadline = time.monotonic() + timeout_s
        parts: list[str] = []
        while True:
            line = self._line(deadline)
            if line is None:
                return -1, "\n".join(parts) or ("timeout" if self.timed_out else "eof")
            parts.append(line)
            if len(line) < 4 or line[3] != "-":
                code = int(line[:3]) if line[:3].isdigit() else -1
                return code, "\n".join(parts)

    def command(self, line: str, timeout_s: float = 10.0) -> tuple[int, str]:
        self.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return self.reply(timeout_s)

    def read_until_eof(self, timeout_s: float = 30.0) -> list[str]:
        """Every further reply line until the node closes the connection (or the deadline)."""
        deadline = time.monotonic() + timeout_s
        start = len(self.lines)
        while self._line(deadline) is not None:
            pass
        if self.buf and self.eof:  # a last line without CRLF
            self.lines.append(self.buf.decode("utf-8", "replace"))
            self.buf = b""
        return self.lines[start:]
