"""DKIM on real nodes: keys made with `mqnode dkim keygen`, published on a real DNS server,
checked with `mqnode dkim check`, and the bytes a real receiver got verified by dkimpy
with the key looked up in that DNS server.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import dns.nameserver
import dns.resolver
import pytest

from tests.support.api import post_json as api_post
from tests.support.chaos import post_json
from tests.support.cli import run_cli
from tests.support.cluster import ADMIN_TOKEN, FAST_TUNING, Cluster
from tests.support.dnsserver import DnsServer
from tests.support.procs import children
from tests.support.smtp import submit
from tests.support.smtpsink import SinkHost, bind_common_port

pytestmark = pytest.mark.integration

DOMAIN = "signer.test"


def _keygen(out: Path, selector: str, algorithm: str) -> tuple[str, str]:
    """(the key file, its TXT record's text) from `mqnode dkim keygen`."""
    proc = run_cli(
        "dkim", "keygen", "--domain", DOMAIN, "--selector", selector,
        "--algorithm", algorithm, "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    zone_line = next(line for line in proc.stdout.splitlines() if " IN TXT " in line)
    strings = re.findall(r'"([^"]*)"', zone_line)
    return str(out / f"{DOMAIN}.{selector}.key"), "".join(strings)


def _txt(text: str) -> str:
    """TXT rdata as the DNS server takes it: quoted strings of at most 255 bytes."""
    return " ".join(f'"{text[i : i + 255]}"' for i in range(0, len(text), 255))


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[str, str]]:
    return {alg: _keygen(tmp_path / "keys", f"{alg}1", alg) for alg in ("rsa", "ed25519")}


@pytest.fixture
def dns_server(keys: dict[str, tuple[str, str]]) -> Iterator[DnsServer]:
    zones: dict[str, Any] = {
        f"{alg}1._domainkey.{DOMAIN}": {"TXT": [_txt(text)]} for alg, (_, text) in keys.items()
    }
    zones[f"_dmarc.{DOMAIN}"] = {"TXT": [_txt("v=DMARC1; p=reject")]}
    with DnsServer(zones) as server:
        yield server


def _dnsfunc(server: DnsServer) -> Any:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(server.host, server.port)]

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(b"".join(r.strings) for r in answer)

    return lookup


def test_keygen_publish_check_round_trip(
    keys: dict[str, tuple[str, str]], dns_server: DnsServer, tmp_path: Path
) -> None:
    dns_addr = f"{dns_server.host}:{dns_server.port}"
    for alg, (path, _) in keys.items():
        proc = run_cli(
            "dkim", "check", "--domain", DOMAIN, "--selector", f"{alg}1",
            "--key", path, "--dns-server", dns_addr,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "published, and it is this key's" in proc.stdout
        assert "DMARC policy p=reject" in proc.stdout
    other, _ = _keygen(tmp_path / "other", "rsa1", "rsa")  # same name, another key
    proc = run_cli(
        "dkim", "check", "--domain", DOMAIN, "--selector", "rsa1",
        "--key", other, "--dns-server", dns_addr,
    )  # fmt: skip
    assert proc.returncode == 1 and "published, but not this key" in proc.stdout


@pytest.mark.parametrize("workers", [0, 2], ids=["in-node", "2-smtp-workers"])
def test_delivered_mail_verifies_with_both_keys(
    keys: dict[str, tuple[str, str]], dns_server: DnsServer, tmp_path: Path, workers: int
) -> None:
    port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        sink = host.add("receiver", socks["127.0.0.1"])
        args = [*FAST_TUNING, "--smtp-workers", str(workers)]
        for alg, (path, _) in keys.items():
            args += ["--dkim-key", f"{DOMAIN}:{alg}1:{path}"]
        with Cluster(tmp_path, extra_args=args, relay_host=f"127.0.0.1:{port}") as c:
            bodies = {
                "ascii": b"From: A <a@signer.test>\r\nTo: r@example.net\r\nSubject: hi\r\n"
                b"Message-ID: <ascii@signer.test>\r\n\r\nhello\r\n",
                "8bit": "From: A <a@signer.test>\r\nTo: r@example.net\r\nSubject: héllo\r\n"
                "Message-ID: <8bit@signer.test>\r\n\r\ncafé crème\r\n".encode(),
                "large": b"From: A <a@signer.test>\r\nTo: r@example.net\r\nSubject: big\r\n"
                b"Message-ID: <large@signer.test>\r\n\r\n" + b"0123456789" * 7 + b"\r\n" * 1
                + base64.encodebytes(os.urandom(800_000)).replace(b"\n", b"\r\n"),
                # Over 1 MiB that does not compress: replicated as chunks (the 5 MiB of
                # text in the leader-kill test below is deflated where it is accepted),
                # and signed in a child process (signing/signing_process.py)
                "unsigned": b"From: B <b@other.test>\r\nTo: r@example.net\r\nSubject: no\r\n"
                b"Message-ID: <unsigned@other.test>\r\n\r\nno key for this domain\r\n",
            }  # fmt: skip
            for i, body in enumerate(bodies.values()):
                node = c.nodes[i % 3]
                code, text, _ = submit(
                    node.host, node.smtp_port, "a@signer.test", ["r@example.net"], body
                )
                assert code == 250, text
            if workers:  # the large one was signed in its worker's child
                assert _workers_signing_children(c), "no SMTP worker has a signing process"
            # The HTTP API signs with the same keys (intake.py, as SMTP).
            api = {
                "from": "a@signer.test",
                "to": ["r@example.net"],
                "subject": "through the API",
                "text": "signed too\n",
                "headers": {"Message-ID": "<api@signer.test>"},
            }
            status, answer, _ = api_post(c.nodes[1].admin_url + "/v1/messages", api, ADMIN_TOKEN)
            assert status == 200, answer
            # Over 1 MiB: signed in the node's signing process (signing/signing_process.py)
            big = {
                **api,
                "subject": "big through the API",
                "text": "a line of words to sign\n" * 100_000,  # 2.4 MB
                "headers": {"Message-ID": "<api-big@signer.test>"},
            }
            status, answer, _ = api_post(c.nodes[1].admin_url + "/v1/messages", big, ADMIN_TOKEN)
            assert status == 200, answer

            def arrived() -> tuple[list[Any] | None, str]:
                got = [d for d in sink.datas if d.reply.startswith("250")]
                return (got if len(got) > len(bodies) + 1 else None), f"{len(got)} arrived"

            got = c.poll("every message at the receiver", arrived, 60)

            def counted() -> tuple[bool | None, str]:
                total = 0.0
                for node in c.nodes:
                    with urllib.request.urlopen(node.admin_url + "/metrics", timeout=5) as r:
                        text = r.read().decode()
                    found = re.search(
                        r'^mqnode_dkim_signed_messages_total\{domain="signer.test"\} (\S+)$',
                        text,
                        re.M,
                    )
                    total += float(found.group(1)) if found else 0.0
                return (True if total == 5 else None), f"{total} signed in the metrics"

            c.poll("the five signed messages in the nodes' metrics", counted, 20)
    verify = _dnsfunc(dns_server)
    by_id = {d.message_id: d.content for d in got}
    for name, sent in bodies.items():
        content = by_id[f"<{name}@{'other' if name == 'unsigned' else 'signer'}.test>"]
        header = content.split(b"\r\n\r\n", 1)[0]
        count = len(re.findall(rb"(?mi)^DKIM-Signature:", header))
        if name == "unsigned":
            assert count == 0
            continue
        assert count == 2, header[:400]
        assert b"a=rsa-sha256" in header and b"a=ed25519-sha256" in header
        d = dkim.DKIM(content)
        assert [d.verify(idx=i, dnsfunc=verify) for i in range(2)] == [True, True], name
        assert content.endswith(sent.split(b"\r\n\r\n", 1)[1])  # the body as it was sent
    for name in ("api", "api-big"):
        d = dkim.DKIM(by_id[f"<{name}@signer.test>"])
        assert [d.verify(idx=i, dnsfunc=verify) for i in range(2)] == [True, True], name


def _workers_signing_children(c: Cluster) -> list[int]:
    """Processes that multiprocessing spawned for the nodes' SMTP workers."""
    found = []
    for node in c.nodes:
        assert node.proc is not None
        for worker in children(node.proc.pid):
            for child in children(worker):
                with contextlib.suppress(OSError):
                    if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                        found.append(child)
    return found


def _status_key_sets(c: Cluster) -> set[str]:
    return {c.status(i)["dkim"]["key_set"] for i in range(3)}


def _hup(c: Cluster, i: int) -> None:
    proc = c.nodes[i].proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGHUP)


def test_keys_rotate_without_a_restart_and_a_bad_key_keeps_the_old_ones(
    keys: dict[str, tuple[str, str]], dns_server: DnsServer, tmp_path: Path
) -> None:
    """A new selector through the config file and SIGHUP (and POST /dkim/reload), under
    load, with SMTP workers: every message is signed by the old key or the new one,
    whole; a key file that cannot be used is refused and the old keys stay."""
    new_path, new_text = _keygen(tmp_path / "new", "rsa2", "rsa")
    dns_server.set_zones(
        {
            f"rsa1._domainkey.{DOMAIN}": {"TXT": [_txt(keys["rsa"][1])]},
            f"rsa2._domainkey.{DOMAIN}": {"TXT": [_txt(new_text)]},
        }
    )
    conf = tmp_path / "dkim.toml"
    conf.write_text(f'dkim_keys = ["{DOMAIN}:rsa1:{keys["rsa"][0]}"]\n')
    port, socks = bind_common_port(["127.0.0.1"])
    phase: dict[str, str] = {}  # Message-ID -> the selector it must carry ("" either)
    with SinkHost() as host:
        sink = host.add("receiver", socks["127.0.0.1"])
        args = [*FAST_TUNING, "--smtp-workers", "2", "--config", str(conf)]
        with Cluster(tmp_path / "c", extra_args=args, relay_host=f"127.0.0.1:{port}") as c:
            before = _status_key_sets(c)
            assert len(before) == 1 and "" not in before

            def send(n: int, selector: str) -> None:
                for _ in range(n):
                    i = len(phase)
                    node = c.nodes[i % 3]
                    mid = f"<rot{i}@{DOMAIN}>"
                    body = (
                        f"From: a@{DOMAIN}\r\nTo: r@example.net\r\nSubject: {i}\r\n"
                        f"Message-ID: {mid}\r\n\r\nmessage {i}\r\n"
                    ).encode()
                    code, text, _ = submit(
                        node.host, node.smtp_port, f"a@{DOMAIN}", ["r@x.test"], body
                    )
                    assert code == 250, text
                    phase[mid] = selector

            send(6, "rsa1")
            conf.write_text(f'dkim_keys = ["{DOMAIN}:rsa2:{new_path}"]\n')
            for i in (0, 1):
                _hup(c, i)
                send(3, "")  # the signal is being handled: either key, never none
            reloaded = post_json(c, 2, "/dkim/reload", {})
            assert reloaded["domains"] == [DOMAIN]

            def changed() -> tuple[bool | None, str]:
                sets = _status_key_sets(c)
                return (True if len(sets) == 1 and sets != before else None), str(sets)

            c.poll("every node's key set to change", changed, 20)
            send(6, "rsa2")
            bad = tmp_path / "bad.key"
            bad.write_text("not a key\n")
            bad.chmod(0o600)
            conf.write_text(f'dkim_keys = ["{DOMAIN}:rsa3:{bad}"]\n')
            with pytest.raises(urllib.error.HTTPError) as refused:
                post_json(c, 0, "/dkim/reload", {})
            assert refused.value.code == 400 and "bad.key" in refused.value.read().decode()
            _hup(c, 1)

            def logged() -> tuple[bool | None, str]:
                text = c.nodes[1].log_path.read_text(errors="replace")
                return (True if "dkim reload refused" in text else None), "no line yet"

            c.poll("the refused reload to be logged", logged, 20)
            after = _status_key_sets(c)
            assert after != before and len(after) == 1  # the bad key changed nothing
            send(3, "rsa2")

            def arrived() -> tuple[list[Any] | None, str]:
                got = [d for d in sink.datas if d.reply.startswith("250")]
                return (got if len(got) >= len(phase) else None), f"{len(got)}/{len(phase)}"

            got = c.poll("every message at the receiver", arrived, 60)
    verify = _dnsfunc(dns_server)
    seen = set()
    for d in got:
        header = d.content.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ")
        assert header.count(b"DKIM-Signature:") == 1, header[:300]
        assert dkim.DKIM(d.content).verify(dnsfunc=verify), d.message_id
        found = re.search(rb"\bs=(rsa\d);", header)
        assert found is not None
        selector = found.group(1).decode()
        assert phase[d.message_id] in ("", selector), (d.message_id, selector)
        seen.add(selector)
    assert seen == {"rsa1", "rsa2"}


def test_signatures_survive_a_leader_kill_mid_delivery(
    keys: dict[str, tuple[str, str]], dns_server: DnsServer, tmp_path: Path
) -> None:
    """The leader is killed -9 while the receiver holds its replies: the new leader
    delivers the replicated bytes, signed once at ingress, so every copy the receiver
    got (a redelivery included) verifies and copies of one message are identical.
    Sizes from 1 KiB to 5 MiB, 8-bit, and a message that came already signed."""
    port, socks = bind_common_port(["127.0.0.1"])
    outside = (
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=list.example; s=s1;"
        b" h=from; bh=AAAA; b=BBBB\r\n"
    )  # a signature from an earlier hop: kept, below ours

    def message(name: str, body: bytes, subject: str = "hi") -> bytes:
        head = f"From: A <a@{DOMAIN}>\r\nTo: r@example.net\r\nSubject: {subject}\r\n"
        head += f"Message-ID: <{name}@{DOMAIN}>\r\n\r\n"
        return head.encode() + body

    line = b"x" * 76 + b"\r\n"
    bodies = {
        "small": message("small", line * 12),
        "8bit": message("8bit", "café crème\r\n".encode() * 80, "héllo"),
        "signed": outside + message("signed", line * 12),
        "5mib": message("5mib", line * (5 * 1024 * 1024 // len(line))),
    }
    with SinkHost() as host:
        sink = host.add("receiver", socks["127.0.0.1"], reply_delay_s=3.0, smtputf8=True)
        args = [*FAST_TUNING, "--smtp-workers", "2"]
        for alg, (path, _) in keys.items():
            args += ["--dkim-key", f"{DOMAIN}:{alg}1:{path}"]
        with Cluster(tmp_path, extra_args=args, relay_host=f"127.0.0.1:{port}") as c:
            leader = c.leader()
            node = c.nodes[leader]
            for body in bodies.values():
                code, text, _ = submit(node.host, node.smtp_port, f"a@{DOMAIN}", ["r@x.test"], body)
                assert code == 250, text
            c.poll(
                "a delivery held by the receiver",
                lambda: (True if sink.in_progress else None, f"{len(sink.datas)} recorded"),
                30,
            )
            # `queue show` reads the signing domains from the stored header alone (the
            # 5 MiB body is kept deflated); an earlier hop's signature comes after ours
            shown = {
                m["message_id"]: c.get(leader, f"/queue/{m['id']}")["dkim_domains"]
                for m in c.queue_messages(leader)
            }
            # (a listing without the message would otherwise fail as a bare KeyError)
            listed = {m["message_id"]: m["state"] for m in c.queue_messages(leader)}
            assert f"<5mib@{DOMAIN}>" in shown, (listed, c.leader(), len(sink.datas))
            assert shown[f"<5mib@{DOMAIN}>"][0] == DOMAIN, shown
            assert shown[f"<signed@{DOMAIN}>"][-1] == "list.example", shown
            c.kill(leader)
            new = c.wait_for_leader(among=[i for i in range(3) if i != leader])

            def delivered() -> tuple[bool | None, str]:
                left = c.queue_messages(new)
                return (True if not left else None), f"{len(left)} still queued"

            c.poll("the new leader to deliver everything", delivered, 90)
            ids = {d.message_id for d in sink.datas}
            assert len(ids) == len(bodies)
            assert len(sink.datas) > len(bodies)  # a held delivery was made again
            copies: dict[str, set[bytes]] = {}
            for d in sink.datas:
                copies.setdefault(d.message_id, set()).add(d.content)
    verify = _dnsfunc(dns_server)
    for name, sent in bodies.items():
        got = copies[f"<{name}@{DOMAIN}>"]
        assert len(got) == 1, f"{name}: {len(got)} different copies"  # signed once
        content = got.pop()
        header = content.split(b"\r\n\r\n", 1)[0]
        assert len(re.findall(rb"(?mi)^DKIM-Signature:", header)) == (3 if name == "signed" else 2)
        d = dkim.DKIM(content)
        assert [d.verify(idx=i, dnsfunc=verify) for i in range(2)] == [True, True], name
        assert content.endswith(sent.split(b"\r\n\r\n", 1)[1])
