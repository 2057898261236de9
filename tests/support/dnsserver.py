"""A small authoritative DNS server for tests, built on dnspython.

Serves UDP and TCP on one 127.0.0.0/8 port from a zone description, either
in-process (`DnsServer`, a thread) or as a subprocess:

    python -m tests.support.dnsserver --listen 127.0.0.1:PORT --zones zones.json
        [--ttl 60] [--query-log FILE] [--max-lifetime-s 3600]

The subprocess prints `dnsserver listening on HOST:PORT` once it serves
(PORT 0 picks a free port), reloads the JSON file on SIGHUP (a bad file keeps
the old zones and says so on stderr) and exits 0 on SIGTERM or SIGINT.

Zone description (a JSON-able dict; names case-insensitive, trailing dot
optional):

    {"example.test": {"MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]]},
     "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"], "TTL": 5},
     "alias.test": {"CNAME": "mx1.example.test"},
     "nullmx.test": {"MX": [[0, "."]]},
     "servfail.test": "SERVFAIL",        # also "REFUSED"
     "slow.test": "TIMEOUT"}             # never answered

Answers, as an authoritative server would give them:
- a present name with the asked type: NOERROR with the records (AA set);
  CNAMEs are followed inside the description (at most 8 hops);
- a present name without that type, or an empty non-terminal (an ancestor of a
  present name, e.g. "test" above): NOERROR, empty answer (NODATA);
- anything else: NXDOMAIN. Names *below* a present name do not exist unless
  listed (RFC 8020: NXDOMAIN means nothing at or below the name).
- Negative answers carry an SOA in the authority section whose TTL and
  MINIMUM are the name's TTL, so resolvers can cache them (RFC 2308).

TTL: the server's `ttl` (default 60) unless the name sets "TTL". Other record
types may be given as lists of rdata text (names in them must be absolute).

Over UDP an answer is cut to 512 bytes (or the query's EDNS payload) with TC
set, so large answers exercise the resolver's TCP fallback.

Queries are counted (`queries`, `query_count()`); the subprocess can append
`NAME TYPE` lines to a query log. Limits: 64 TCP connections, closed after
10 s idle; 100 000 remembered queries; the serving loop ends after
`max_lifetime_s` even if nobody calls `stop()`.
"""

from __future__ import annotations

import argparse
import json
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zones = Mapping[str, Any]

_MAX_TCP_CONNS = 64
_TCP_IDLE_S = 10.0
_MAX_QUERIES_KEPT = 100_000
_MAX_CNAME_HOPS = 8
_BIND_ATTEMPTS = 20
_SPECIAL = ("SERVFAIL", "REFUSED", "TIMEOUT")


def _norm(name: str) -> str:
    name = name.strip().lower()
    return name[:-1] if name.endswith(".") and name != "." else name


def _abs(name: str) -> str:
    return name if name.endswith(".") else name + "."


def mx_zones(hosts: dict[str, str]) -> dict[str, Any]:
    """For each `name: ip`: `name.test` with MX 10 `mx.name.test`, which has A `ip`."""
    out: dict[str, Any] = {}
    for name, ip in hosts.items():
        out[f"{name}.test"] = {"MX": [[10, f"mx.{name}.test"]]}
        out[f"mx.{name}.test"] = {"A": [ip]}
    return out


def normalise_zones(zones: Zones) -> dict[str, Any]:
    """Check a zone description and return it with normalised names; raises ValueError."""
    out: dict[str, Any] = {}
    for raw_name, entry in zones.items():
        name = _norm(raw_name)
        if isinstance(entry, str):
            if entry.upper() not in _SPECIAL:
                raise ValueError(f"{raw_name}: {entry!r} is not one of {_SPECIAL}")
            out[name] = entry.upper()
        elif isinstance(entry, Mapping):
            out[name] = {str(k).upper(): v for k, v in entry.items()}
        else:
            raise ValueError(f"{raw_name}: entry must be a dict or one of {_SPECIAL}")
    return out


class DnsServer:
    """An authoritative test DNS server on 127.0.0.0/8, UDP and TCP on one port.

    `start()` binds (so `port` is known when it returns) and serves from a
    thread; `stop()` ends the thread and closes every socket. Thread-safe:
    `set_zones()` may be called while serving.
    """

    def __init__(
        self,
        zones: Zones,
        host: str = "127.0.0.1",
        port: int = 0,
        ttl: int = 60,
        max_lifetime_s: float = 600.0,
        query_log: Path | None = None,
    ) -> None:
        if not host.startswith("127."):
            raise ValueError("test DNS server listens on 127.0.0.0/8 only")
        self.host = host
        self.port = port
        self.ttl = ttl
        self._max_lifetime_s = max_lifetime_s
        self._query_log = query_log
        self._lock = threading.Lock()
        self._zones = normalise_zones(zones)
        self._queries: list[tuple[str, str]] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- control -----------------------------------------------------------

    def set_zones(self, zones: Zones) -> None:
        """Replace the zone description; later queries see the new answers."""
        normalised = normalise_zones(zones)
        with self._lock:
            self._zones = normalised

    @property
    def queries(self) -> list[tuple[str, str]]:
        """(name, type) of every query received so far, oldest first."""
        with self._lock:
            return list(self._queries)

    def query_count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """How many queries matched `name` (normalised) and/or `rdtype`."""
        want_name = None if name is None else _norm(name)
        want_type = None if rdtype is None else rdtype.upper()
        return sum(
            1
            for qn, qt in self.queries
            if (want_name is None or qn == want_name) and (want_type is None or qt == want_type)
        )

    def reset_queries(self) -> None:
        with self._lock:
            self._queries.clear()

    def start(self) -> DnsServer:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._bind()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="dnsserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        thread.join(timeout=10.0)
        if thread.is_alive():
            raise RuntimeError("dnsserver thread did not stop within 10 s")
        self._thread = None
        for s in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._udp = self._tcp = self._wake_r = self._wake_w = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- sockets -----------------------------------------------------------

    def _bind(self) -> None:
        last_error: OSError | None = None
        for _ in range(_BIND_ATTEMPTS):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                udp.bind((self.host, self.port))
                port = udp.getsockname()[1]
                tcp.bind((self.host, port))
                tcp.listen(16)
            except OSError as exc:
                udp.close()
                tcp.close()
                last_error = exc
                if self.port != 0:
                    break
                continue
            udp.setblocking(False)
            tcp.setblocking(False)
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise OSError(f"cannot bind UDP+TCP on {self.host}:{self.port}: {last_error}")

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None and self._wake_r is not None
        sel = selectors.DefaultSelector()
        conns: dict[socket.socket, tuple[bytearray, float]] = {}
        deadline = time.monotonic() + self._max_lifetime_s
        try:
            sel.register(self._udp, selectors.EVENT_READ)
            sel.register(self._tcp, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set() and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=0.5):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._wake_r:
                        return
                    if sock is self._udp:
                        self._on_udp()
                    elif sock is self._tcp:
                        self._on_accept(sel, conns)
                    else:
                        self._on_tcp_data(sock, sel, conns)
                now = time.monotonic()
                for conn, (_, last) in list(conns.items()):
                    if now - last > _TCP_IDLE_S:
                        self._close_conn(conn, sel, conns)
        finally:
            for conn in list(conns):
                self._close_conn(conn, sel, conns)
            sel.close()

    def _on_udp(self) -> None:
        assert self._udp is not None
        try:
            data, peer = self._udp.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            return
        wire = self._respond(data, tcp=False)
        if wire is not None:
            try:
                self._udp.sendto(wire, peer)
            except OSError:
                pass

    def _on_accept(
        self, sel: selectors.BaseSelector, conns: dict[socket.socket, tuple[bytearray, float]]
    ) -> None:
        assert self._tcp is not None
        try:
            conn, _ = self._tcp.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(conns) >= _MAX_TCP_CONNS:
            conn.close()
            return
        conn.settimeout(2.0)  # for sendall; reads happen only when readable
        conns[conn] = (bytearray(), time.monotonic())
        sel.register(conn, selectors.EVENT_READ)

    def _on_tcp_data(
        self,
        conn: socket.socket,
        sel: selectors.BaseSelector,
        conns: dict[socket.socket, tuple[bytearray, float]],
    ) -> None:
        try:
            chunk = conn.recv(65535)
        except OSError:
            chunk = b""
        if not chunk:
            self._close_conn(conn, sel, conns)
            return
        buf, _ = conns[conn]
        buf.extend(chunk)
        conns[conn] = (buf, time.monotonic())
        while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
            size = int.from_bytes(buf[:2], "big")
            frame = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            wire = self._respond(frame, tcp=True)
            if wire is None:
                continue
            try:
                conn.sendall(len(wire).to_bytes(2, "big") + wire)
            except OSError:
                self._close_conn(conn, sel, conns)
                return

    @staticmethod
    def _close_conn(
        conn: socket.socket,
        sel: selectors.BaseSelector,
        conns: dict[socket.socket, tuple[bytearray, float]],
    ) -> None:
        conns.pop(conn, None)
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    # -- answers -----------------------------------------------------------

    def _respond(self, data: bytes, tcp: bool) -> bytes | None:
        """Wire response to one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        question = query.question[0]
        qname = _norm(question.name.to_text())
        qtype = dns.rdatatype.to_text(question.rdtype)
        self._record(qname, qtype)
        try:
            if not self._fill(response, qname, question.rdtype):
                return None
        except Exception:  # a bad zone entry: say so, keep serving
            traceback.print_exc()
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
        if tcp:
            return response.to_wire(max_size=65535)
        max_size = query.payload if query.edns >= 0 else 512
        return response.to_wire(max_size=max(512, max_size), prefer_truncation=True)

    def _record(self, qname: str, qtype: str) -> None:
        with self._lock:
            if len(self._queries) < _MAX_QUERIES_KEPT:
                self._queries.append((qname, qtype))
        if self._query_log is not None:
            with self._query_log.open("a", encoding="utf-8") as f:
                f.write(f"{qname} {qtype}\n")

    def _fill(
        self, response: dns.message.Message, qname: str, rdtype: dns.rdatatype.RdataType
    ) -> bool:
        """Put the answer for (qname, rdtype) into `response`; False means do not answer."""
        with self._lock:
            zones = self._zones
        response.flags |= dns.flags.AA
        name = qname
        for _ in range(_MAX_CNAME_HOPS):
            entry = zones.get(name)
            if entry == "TIMEOUT":
                return False
            if isinstance(entry, str):
                response.set_rcode(dns.rcode.from_text(entry))
                return True
            if entry is None:
                exists = any(other.endswith("." + name) for other in zones) or name == "."
                if not exists:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                self._add_soa(response, name, self.ttl)
                return True
            ttl = int(entry.get("TTL", self.ttl))
            cname = entry.get("CNAME")
            if cname is not None and rdtype != dns.rdatatype.CNAME:
                target = cname if isinstance(cname, str) else cname[0]
                response.answer.append(
                    dns.rrset.from_text(_abs(name), ttl, "IN", "CNAME", _abs(target))
                )
                name = _norm(target)
                continue
            texts = self._rdata_texts(entry, dns.rdatatype.to_text(rdtype))
            if texts:
                rtype = dns.rdatatype.to_text(rdtype)
                response.answer.append(
                    dns.rrset.from_text_list(_abs(name), ttl, "IN", rtype, texts)
                )
            else:
                self._add_soa(response, name, ttl)
            return True
        response.set_rcode(dns.rcode.SERVFAIL)  # CNAME loop
        return True

    @staticmethod
    def _rdata_texts(entry: Mapping[str, Any], rtype: str) -> list[str]:
        values = entry.get(rtype)
        if values is None:
            return []
        if isinstance(values, str):
            values = [values]
        if rtype == "MX":
            return [f"{int(pref)} {_abs(str(exchange))}" for pref, exchange in values]
        if rtype == "CNAME":
            return [_abs(str(v)) for v in values]
        return [str(v) for v in values]

    @staticmethod
    def _add_soa(response: dns.message.Message, name: str, ttl: int) -> None:
        labels = name.split(".")
        apex = ".".join(labels[-2:]) if len(labels) >= 2 else name
        apex = _abs(apex) if apex != "." else "."
        soa = f"ns.{apex} hostmaster.{apex} 1 3600 600 86400 {ttl}"
        response.authority.append(dns.rrset.from_text(apex, ttl, "IN", "SOA", soa))


# -- subprocess mode -------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be an object")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.dnsserver")
    parser.add_argument("--listen", required=True, help="HOST:PORT on 127.0.0.0/8; PORT 0 = free")
    parser.add_argument("--zones", required=True, type=Path, help="zone description JSON file")
    parser.add_argument("--ttl", type=int, default=60)
    parser.add_argument("--query-log", type=Path, default=None)
    parser.add_argument("--max-lifetime-s", type=float, default=3600.0)
    args = parser.parse_args(argv)
    host, _, port_text = args.listen.rpartition(":")
    server = DnsServer(
        _load(args.zones),
        host=host,
        port=int(port_text),
        ttl=args.ttl,
        max_lifetime_s=args.max_lifetime_s,
        query_log=args.query_log,
    )
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        try:
            server.set_zones(_load(args.zones))
        except (OSError, ValueError) as exc:
            print(f"dnsserver: reload failed, keeping old zones: {exc}", file=sys.stderr)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    server.start()
    print(f"dnsserver listening on {server.host}:{server.port}", flush=True)
    deadline = time.monotonic() + args.max_lifetime_s
    try:
        while not stop.wait(0.2) and time.monotonic() < deadline:
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
