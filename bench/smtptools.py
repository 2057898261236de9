"""smtp-source and smtp-sink, Postfix's SMTP test tools: a load generator not ours.

    with smtp_sink(port) as sink:                 # counts what it receives
        elapsed_s, rate = run_source(port, messages=2000, sessions=20, size=1024)
        sink.received()

smtp-source(1) sends `messages` over `sessions` parallel connections, a new
connection per message unless keep_session (-d), and exits non-zero on the
first unexpected reply, so a clean exit means every message got its 250.
smtp-sink(1) answers 250 to everything and, with -c, rewrites a counter line
("sess=N quit=N mesg=N") after each message; that counter is read back from a
file, never a pipe, so it cannot stall the sink.

Both are looked up on $PATH plus /usr/sbin and /usr/local/sbin (Debian ships
them in the postfix package). Nothing is installed here. As root, smtp-sink
drops to `nobody` (it refuses to run as root without -u).

Limits: smtp-source is killed after max_s; the sink's start and every wait
are bounded in time; all traffic on 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
TOOLS = ("smtp-source", "smtp-sink")
SINK_USER = "nobody"  # smtp-sink insists on -u when started as root
SENDER = "bench@sender.test"
RECIPIENT = "sink@relay.test"
POLL_S = 0.05


class PostfixBenchError(RuntimeError):
    """A Postfix tool failed, timed out or did not come up."""


def search_path(path: str | None = None) -> str:
    """`path` as given, else $PATH plus the sbin directories Postfix installs into."""
    if path is not None:
        return path
    return os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])


def which(name: str, path: str | None = None) -> str:
    found = shutil.which(name, path=search_path(path))
    if found is None:
        raise PostfixBenchError(f"{name} not found")
    return found


def wait_smtp_banner(
    port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll 127.0.0.1:port until it greets with 220, then QUIT; bounded by timeout_s.

    Gives up early when `proc` (the server, if we started it directly) exited.
    """
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PostfixBenchError(f"server on port {port} exited {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=2.0) as s:
                banner = s.recv(512).decode("ascii", "replace")
                s.sendall(b"QUIT\r\n")
                if banner.startswith("220"):
                    return
                last = banner.strip()
        except OSError as exc:
            last = str(exc)
        time.sleep(POLL_S * 2)
    raise PostfixBenchError(f"nothing greeting on {HOST}:{port} after {timeout_s:.0f}s: {last}")


SINK_COUNTER = re.compile(rb"mesg=(\d+)\r")


def sink_count(tail: bytes) -> int:
    """The last complete `mesg=N` of smtp-sink -c output (0 before the first message)."""
    counts = SINK_COUNTER.findall(tail)
    return int(counts[-1]) if counts else 0


class Sink:
    """A running smtp-sink; `received()` is its message counter (-c output)."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes], out_fd: int) -> None:
        self.port = port
        self.proc = proc
        self._out_fd = out_fd

    def received(self) -> int:
        """Messages smtp-sink got so far (it rewrites a counter line after each '.')."""
        size = os.fstat(self._out_fd).st_size
        return sink_count(os.pread(self._out_fd, 128, max(0, size - 128)))

    def wait_for(self, count: int, max_s: float) -> bool:
        """Poll until `count` messages arrived; False after max_s."""
        deadline = time.monotonic() + max_s
        while self.received() < count:
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                return False
            time.sleep(POLL_S / 5)  # fine-grained: this wait ends the e2e timing
        return True


@contextlib.contextmanager
def smtp_sink(
    port: int, *, path: str | None = None, max_conns: int = 256, start_timeout_s: float = 10.0
) -> Iterator[Sink]:
    """Run `smtp-sink -c` on 127.0.0.1:port; its counter goes to an unnamed temp file.

    Files, not pipes: a pipe nobody drains would stall the sink mid-run.
    """
    argv = [which("smtp-sink", path), "-c", "-4", "-m", str(max_conns)]
    if os.geteuid() == 0:
        argv += ["-u", SINK_USER]
    argv += [f"{HOST}:{port}", "1024"]
    with (
        tempfile.TemporaryFile(prefix="smtp-sink-") as out,
        tempfile.TemporaryFile(prefix="smtp-sink-err-") as err,
    ):
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        try:
            try:
                wait_smtp_banner(port, start_timeout_s, proc)
            except PostfixBenchError as exc:
                raise PostfixBenchError(f"smtp-sink: {exc}: {tail(err)}") from exc
            yield Sink(port, proc, out.fileno())
        finally:
            stop_process(proc)
        if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            raise PostfixBenchError(f"smtp-sink exited {proc.returncode}: {tail(err)}")


def tail(fh: IO[bytes], limit: int = 400) -> str:
    """The last `limit` bytes of an output file, for error messages."""
    fh.seek(0)
    return fh.read().decode(errors="replace").strip()[-limit:]


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after timeout_s; always reaps."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


def run_source(
    port: int,
    messages: int,
    sessions: int,
    size: int,
    recipients: int = 1,
    *,
    keep_session: bool = False,
    max_s: float = 120.0,
    path: str | None = None,
    to: str = RECIPIENT,
    message_file: Path | None = None,
) -> tuple[float, float]:
    """Send `messages` with smtp-source to 127.0.0.1:port; return (elapsed_s, msg/s).

    smtp-source aborts on the first reply that is not the expected positive
    one, so a clean exit means every message got its 250. Raises
    PostfixBenchError on a non-zero exit, or when it is still running after
    max_s (it is then killed).
    """
    argv = [which("smtp-source", path), "-4", "-m", str(messages), "-s", str(sessions)]
    if message_file is None:
        argv += ["-l", str(size)]
    else:  # this message instead of -l bytes of text
        argv += ["-F", str(message_file)]
    argv += ["-r", str(recipients), "-M", "source.bench.test"]
    argv += ["-f", SENDER, "-t", to]
    if keep_session:
        argv.append("-d")
    argv.append(f"{HOST}:{port}")
    t0 = time.monotonic()
    try:
        res = subprocess.run(argv, capture_output=True, timeout=max_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PostfixBenchError(f"smtp-source still running after {max_s:.0f}s") from exc
    elapsed = time.monotonic() - t0
    if res.returncode != 0:
        err = (res.stderr or res.stdout).decode(errors="replace").strip()
        raise PostfixBenchError(f"smtp-source exited {res.returncode}: {err[-400:]}")
    return elapsed, messages / elapsed


def attachment_message(size: int, dest: Path) -> Path:
    """Write a message of about `size` bytes as mail with an attachment looks, for
    smtp-source -F: a short HTML part and a base64 file (random bytes, which is what
    compressed formats such as PDF and images are to deflate). LF line ends
    (smtp-source sends CRLF)."""
    b64 = base64.encodebytes(os.urandom(max(1, size * 3 // 4))).decode("ascii")
    head = (
        f"From: <{SENDER}>\nTo: <{RECIPIENT}>\nSubject: your statement\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b1"\n\n--b1\n'
        "Content-Type: text/html; charset=utf-8\n\n<p>Your statement is attached.</p>\n"
        '--b1\nContent-Type: application/pdf; name="statement.pdf"\n'
        "Content-Transfer-Encoding: base64\n\n"
    )
    text = head + b64[: max(0, size - len(head) - 8)].rstrip("\n") + "\n--b1--\n"
    dest.write_text(text, encoding="ascii")
    return dest
