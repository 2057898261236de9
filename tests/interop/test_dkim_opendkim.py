"""Our DKIM signatures checked by OpenDKIM (`opendkim-testmsg`), an independent verifier.

opendkim-testmsg looks keys up through the system resolver, so it runs in a
network namespace of its own whose resolv.conf (/etc/netns/NS/resolv.conf)
names a real DNS server on that namespace's 127.0.0.1:53 serving our keys'
TXT records. Needs root, iproute2 and opendkim-tools (scripts/test installs
them on Debian); skipped with the reason otherwise.

SMTPUTF8 messages (UTF-8 in the header) are not here: OpenDKIM 2.11's parser
answers "Syntax error" to any 8-bit header byte, signed or not. dkimpy verifies
those (tests/unit/test_dkim.py, tests/integration/test_dkim.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqnode.clock import ManualClock
from mqnode.delivery.client import dot_stuff
from mqnode.signing.dkim_signer import DkimSigner
from mqnode.signing.keys import ED25519, RSA, DkimKey, KeySet, keygen
from mqnode.smtp.data import unstuff
from mqnode.smtp.handler import SmtpIngress
from tests.unit.kit import Applies, open_store, smtp_data

pytestmark = pytest.mark.interop

TESTMSG = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"
ROOT = Path(__file__).resolve().parents[2]
AT = 1_796_540_000

if os.geteuid() != 0 or not os.path.exists(TESTMSG) or not shutil.which("ip"):
    pytest.skip(
        "needs root, iproute2 and opendkim-tools (opendkim-testmsg)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[DkimKey]:
    out = tmp_path_factory.mktemp("keys")
    return [
        keygen("example.org", "rsa1", RSA, 2048, out),
        keygen("example.org", "ed1", ED25519, 0, out),
    ]


@pytest.fixture(scope="module")
def namespace(keys: list[DkimKey], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ns = f"mqdkim{os.getpid()}"
    zones = tmp_path_factory.mktemp("dns") / "zones.json"

    def txt(text: str) -> str:
        return " ".join(f'"{text[i : i + 255]}"' for i in range(0, len(text), 255))

    zones.write_text(json.dumps({k.record_name: {"TXT": [txt(k.txt_record())]} for k in keys}))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    etc = Path("/etc/netns") / ns
    server: subprocess.Popen[str] | None = None
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
        server = subprocess.Popen(
            [
                "ip", "netns", "exec", ns, sys.executable, "-m", "tests.support.dnsserver",
                "--listen", "127.0.0.1:53", "--zones", str(zones), "--max-lifetime-s", "600",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert server.stdout is not None
        assert "listening" in server.stdout.readline()
        yield ns
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
            if server.stdout is not None:
                server.stdout.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(etc, ignore_errors=True)


def _opendkim(ns: str, message: bytes) -> tuple[int, str]:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, TESTMSG], input=message, capture_output=True, timeout=60
    )
    return proc.returncode, proc.stderr.decode(errors="replace").strip()


HEAD = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
    b"Date: Sun, 06 Dec 2026 07:00:00 +0000\r\nMessage-ID: <m1@example.org>\r\n"
)
MESSAGES = {
    "1KiB": HEAD + b"\r\n" + b"a 1 KiB body line.\r\n" * 50,
    "5MiB": HEAD + b"\r\n" + (b"a line of a large message, 5 MiB in all" + b"\r\n") * 125_000,
    "8bit": HEAD + b"\r\n" + "café crème, 8BITMIME\r\n".encode(),
    "trailing-blank-lines": HEAD + b"\r\nbody\r\n\r\n\r\n",
}


@pytest.mark.parametrize("algorithm", [RSA, ED25519])
@pytest.mark.parametrize("name", list(MESSAGES))
def test_opendkim_verifies_our_signature(
    namespace: str, keys: list[DkimKey], algorithm: str, name: str
) -> None:
    key = next(k for k in keys if k.algorithm == algorithm)
    message = MESSAGES[name]
    sigs, _ = DkimSigner(KeySet([key])).sign(message, AT)
    assert _opendkim(namespace, sigs + message) == (0, "")
    tampered = sigs + message.replace(b"\r\n\r\n", b"\r\n\r\nX", 1)
    code, said = _opendkim(namespace, tampered)
    assert code != 0 and "Bad signature" in said


def test_both_signatures_and_one_that_was_there(namespace: str, keys: list[DkimKey]) -> None:
    message = MESSAGES["1KiB"]
    first, _ = DkimSigner(KeySet([keys[1]])).sign(message, AT)
    ours, _ = DkimSigner(KeySet(keys)).sign(first + message, AT)
    assert ours.count(b"DKIM-Signature:") == 2
    assert _opendkim(namespace, ours + first + message) == (0, "")


ODD_SHAPES = {
    "bare-cr": HEAD + b"\r\nline one\rline two\r\n",
    "bare-lf": HEAD.replace(b"\r\n", b"\n") + b"\nline one\nline two\n",
    "no-empty-line": HEAD + b"hello, no empty line before me\r\n",
    "dot-lines": HEAD + b"\r\n.a dot line\r\n..two dots\r\n.\r\nend",
}


@pytest.mark.parametrize("name", list(ODD_SHAPES))
def test_opendkim_verifies_odd_shapes_as_delivered(
    namespace: str, keys: list[DkimKey], name: str, tmp_path: Path
) -> None:
    """Through intake (SmtpIngress with a signer, the real state machine and LMDB store)
    and out as delivery sends it (dot_stuff), then un-stuffed as the receiver reads it:
    a bare CR, bare LFs, headers with no empty line after them, dot lines."""
    store = open_store(tmp_path / "state")
    try:
        ids = iter(range(1, 100))
        ing = SmtpIngress(
            Applies(store), ManualClock(), lambda n: bytes([next(ids)]) * n, "n1",
            "mx.example.org", ["127.0.0.0/8"], 10, lambda: 0.0,
            signer=DkimSigner(KeySet([keys[0]])),
        )  # fmt: skip
        reply = smtp_data(ing, ODD_SHAPES[name])
        assert reply.startswith("250"), reply
        (queued,) = store.list_messages(10)
        received = unstuff(dot_stuff(store.read_body(queued)))
    finally:
        store.close()
    assert received.count(b"DKIM-Signature:") == 1
    assert _opendkim(namespace, received) == (0, "")
