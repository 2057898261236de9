"""OpenDKIM as a signing milter for a throwaway Postfix: the reference a signing MTA must beat.

    with signing_milter(key_file, "sender.test", "bench") as milter:
        measure_postfix(..., extra_main_cf=postfix_settings(milter))

Postfix signs through the OpenDKIM milter (`opendkim` Debian package): each
message's headers and body go over the milter protocol to the opendkim
daemon, which answers with the DKIM-Signature header to add. The daemon
here runs in the foreground on a Unix socket, signs (mode `s`) for one
domain with one key file, relaxed/relaxed as mqnode's default, and is
stopped by PID. `milter_default_action = tempfail`: a milter that is down
refuses the mail (smtp-source then fails the row) instead of letting it
through unsigned. tests/interop/test_dkim_opendkim.py checks that this very
configuration signs what it relays.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.runners import HOST
from bench.smtptools import PostfixBenchError, search_path, stop_process

START_TIMEOUT_S = 15.0


def available(path: str | None = None) -> str | None:
    """None when the opendkim daemon is installed, else the reason for a skipped row."""
    if shutil.which("opendkim", path=search_path(path)) is None:
        return "not installed: opendkim (Debian/Ubuntu: apt-get install opendkim)"
    return None


def render_conf(base: Path, socket: Path, key_file: Path, domain: str, selector: str) -> str:
    settings = {
        "Mode": "s",
        "Domain": domain,
        "Selector": selector,
        "KeyFile": str(key_file),
        "Socket": f"local:{socket}",
        "UMask": "000",  # Postfix's smtpd, running as the postfix user, connects to it
        "Canonicalization": "relaxed/relaxed",
        "InternalHosts": HOST,  # smtp-source connects from here: mail to sign
        "Syslog": "no",
        "Background": "no",
        "RequireSafeKeys": "no",  # the key belongs to root, the daemon runs as root here
        "PidFile": str(base / "opendkim.pid"),
    }
    return "".join(f"{k} {v}\n" for k, v in settings.items())


def postfix_settings(milter: str) -> dict[str, str]:
    """main.cf settings that send every accepted message through the milter."""
    return {
        "smtpd_milters": milter,
        "non_smtpd_milters": milter,
        "milter_default_action": "tempfail",
        "milter_protocol": "6",
    }


@contextlib.contextmanager
def signing_milter(
    key_file: Path, domain: str, selector: str, path: str | None = None
) -> Iterator[str]:
    """A running opendkim daemon signing for `domain`; yields Postfix's milter address.

    A Unix socket, as Debian's packaging sets it up: the same setup over TCP on
    loopback accepted ~210 msg/s where this accepts ~350 (20 sessions, 1 KiB).
    The daemon itself costs ~1.8 ms of CPU per message here, six times an
    RSA-2048 signature: it is most of the row's gap to plain Postfix."""
    why = available(path)
    if why is not None:
        raise PostfixBenchError(why)
    base = Path(tempfile.mkdtemp(prefix="bench-opendkim-"))
    base.chmod(0o755)  # the postfix user reaches the socket
    try:
        conf, socket = base / "opendkim.conf", base / "milter.sock"
        conf.write_text(render_conf(base, socket, key_file, domain, selector))
        binary = shutil.which("opendkim", path=search_path(path))
        assert binary is not None
        log = base / "opendkim.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([binary, "-f", "-x", str(conf)], stdout=out, stderr=out)
            try:
                deadline = time.monotonic() + START_TIMEOUT_S
                while not socket.is_socket():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        text = log.read_text(errors="replace")[-400:]
                        raise PostfixBenchError(f"opendkim did not listen on {socket}: {text}")
                    time.sleep(0.05)
                yield f"unix:{socket}"
            finally:
                stop_process(proc)
    finally:
        shutil.rmtree(base, ignore_errors=True)
