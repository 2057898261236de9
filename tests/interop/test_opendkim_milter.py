"""The bench's reference signer, Postfix + the OpenDKIM milter, signs what it relays.

bench/paired_dkim.py compares mqnode's signing with this configuration
(bench/opendkim.py); a milter that accepted mail without signing it would
make that row meaningless. Here one message goes through a throwaway
Postfix with the milter to a sink, and dkimpy verifies the signature with
the key served by a real DNS server. Needs root, Postfix and the opendkim
daemon (scripts/test installs them on Debian); skipped with the reason
otherwise.
"""

from __future__ import annotations

import shutil
import smtplib
import tempfile
import time
from pathlib import Path
from typing import Any

import dkim
import dns.nameserver
import dns.resolver
import pytest

from bench import opendkim
from bench import postfix as pf
from mqnode.signing.keys import RSA, keygen
from tests.support.cluster import free_ports
from tests.support.dnsserver import DnsServer
from tests.support.smtpsink import SinkHost, bind_common_port

_WHY_NOT = pf.available() or opendkim.available()
pytestmark = [
    pytest.mark.interop,
    pytest.mark.timeout(120),
    pytest.mark.skipif(_WHY_NOT is not None, reason=f"{_WHY_NOT}"),
]
DOMAIN = "sender.test"


def test_postfix_with_the_opendkim_milter_signs_what_it_relays(tmp_path: Path) -> None:
    key = keygen(DOMAIN, "bench-rsa", RSA, 2048, tmp_path / "keys")
    text = key.txt_record()
    zones: dict[str, Any] = {
        key.record_name: {
            "TXT": [" ".join(f'"{text[i : i + 255]}"' for i in range(0, len(text), 255))]
        }
    }
    port, socks = bind_common_port(["127.0.0.1"])
    base = Path(tempfile.mkdtemp(prefix="mq-interop-milter-"))
    base.chmod(0o755)  # the postfix user must reach its queue
    message = (
        f"From: <bench@{DOMAIN}>\r\nTo: <sink@relay.test>\r\nSubject: milter\r\n"
        f"Message-ID: <milter@{DOMAIN}>\r\n\r\n" + "x" * 70 + "\r\n"
    ).encode()
    try:
        with (
            DnsServer(zones) as server,
            SinkHost() as host,
            opendkim.signing_milter(Path(key.path), DOMAIN, "bench-rsa") as milter,
        ):
            sink = host.add("receiver", socks["127.0.0.1"])
            smtp_port = free_ports(1)[0]
            with pf.throwaway_postfix(
                base, smtp_port, port, extra_main_cf=opendkim.postfix_settings(milter)
            ):
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
                    client.sendmail(f"bench@{DOMAIN}", ["sink@relay.test"], message)
                deadline = time.monotonic() + 60
                while not sink.datas and time.monotonic() < deadline:
                    time.sleep(0.2)
            assert sink.datas, "nothing relayed within 60 s"
            content = sink.datas[0].content
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(server.host, server.port)]

            def lookup(name: bytes, timeout: int = 5) -> bytes | None:
                answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
                return b"".join(b"".join(r.strings) for r in answer)

            header = content.split(b"\r\n\r\n", 1)[0]
            assert b"DKIM-Signature:" in header and b"d=sender.test" in header, header[:400]
            assert dkim.DKIM(content).verify(dnsfunc=lookup)
    finally:
        shutil.rmtree(base, ignore_errors=True)
