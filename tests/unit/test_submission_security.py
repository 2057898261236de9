"""Pure parts of SMTP submission security: rate limits, password hashes, policy, settings."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope, Session
from hypothesis import given
from hypothesis import strategies as st

from mqnode.clock import ManualClock
from mqnode.config import NodeConfig
from mqnode.errors import ConfigError
from mqnode.smtp.auth import PasswordHash, UserDb, hash_password
from mqnode.smtp.handler import IngressLimits, SmtpIngress, client_key, header_count, valid_address
from mqnode.smtp.handler import peer_ip as parse_peer
from mqnode.smtp.ratelimit import ConcurrencyLimiter, RateLimiter
from mqnode.tls import server_context

FAST_N = 16  # scrypt cost for tests: the format is the same, the work trivial

# --- RateLimiter / ConcurrencyLimiter --------------------------------------------


def test_bucket_allows_a_minute_of_burst_then_the_steady_rate() -> None:
    clock = ManualClock()
    rl = RateLimiter(6, clock)  # one token every 10 s
    assert [rl.allow("a") for _ in range(7)] == [True] * 6 + [False]
    clock.advance(9.9)
    assert not rl.allow("a")  # refusals take nothing, and 9.9 s is not a token yet
    clock.advance(0.2)
    assert rl.allow("a")
    assert not rl.allow("a")
    assert rl.allow("b")  # keys are independent
    clock.advance(3600)
    assert [rl.allow("a") for _ in range(7)] == [True] * 6 + [False]  # capped at one minute


def test_bucket_tracks_a_bounded_number_of_clients() -> None:
    clock = ManualClock()
    rl = RateLimiter(3, clock, max_keys=10)
    for i in range(1000):
        assert rl.allow(f"10.0.{i // 256}.{i % 256}")
        assert len(rl) <= 10
    # a client forgotten under pressure is only ever treated as new: allowed
    assert rl.allow("10.0.0.0")


def test_bucket_keeps_recent_clients_under_pressure() -> None:
    clock = ManualClock()
    rl = RateLimiter(2, clock, max_keys=10)
    assert rl.allow("abuser") and rl.allow("abuser")
    for i in range(50):  # many new clients push out the least recently seen, not the abuser
        assert rl.allow(f"c{i}")
        assert not rl.allow("abuser")
        assert len(rl) <= 10


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 30)), max_size=200))
def test_bucket_never_exceeds_its_rate(events: list[tuple[str, float]]) -> None:
    clock = ManualClock()
    rl = RateLimiter(60, clock)
    allowed: dict[str, int] = {}
    elapsed = 0.0
    for key, dt in events:
        clock.advance(dt)
        elapsed += dt
        allowed[key] = allowed.get(key, 0) + rl.allow(key)
    for n in allowed.values():
        assert n <= 60 + elapsed + 1e-6  # burst + 1/s


def test_concurrency_limiter() -> None:
    cl = ConcurrencyLimiter(2)
    assert cl.acquire("a") and cl.acquire("a") and not cl.acquire("a")
    assert cl.acquire("b")
    cl.release("a")
    assert cl.acquire("a")
    cl.release("a")
    cl.release("a")
    cl.release("b")
    assert len(cl) == 0
    with pytest.raises(AssertionError):
        cl.release("a")


# --- passwords -------------------------------------------------------------------


def test_hash_round_trip_and_verify() -> None:
    line = hash_password("s3cret", n=FAST_N)
    assert line.startswith(f"scrypt${FAST_N}$8$1$")
    ph = PasswordHash.parse(line)
    assert ph.format() == line and ph.matches(b"s3cret") and not ph.matches(b"s3creT")
    assert hash_password("s3cret", n=FAST_N) != line  # a fresh salt every time
    db = UserDb.parse(f"# comment\n\nalice@x.test:{line}\nbob:{hash_password('pw', n=FAST_N)}\n")
    assert len(db) == 2
    assert db.verify(b"alice@x.test", b"s3cret") == "alice@x.test"
    assert db.verify(b"alice@x.test", b"wrong") is None
    assert db.verify(b"bob", b"s3cret") is None
    assert db.verify(b"nobody", b"s3cret") is None
    assert db.verify(b"\xff\xfe", b"s3cret") is None
    assert db.verify(b"alice@x.test", b"s3cret" * 1000) is None


@pytest.mark.parametrize(
    "text",
    [
        "alice",  # no hash
        ":scrypt$16$8$1$AAAAAAAAAAA=$" + "A" * 44,  # no user
        "alice:sha256$abc",
        "alice:scrypt$15$8$1$AAAAAAAAAAA=$" + "A" * 44,  # N not a power of two
        "alice:scrypt$2097152$8$1$AAAAAAAAAAA=$" + "A" * 44,  # N too big
        "alice:scrypt$16$8$1$!!!$" + "A" * 44,
        "",  # no users at all
    ],
)
def test_bad_users_file_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        UserDb.parse(text)


def test_duplicate_user_is_a_config_error() -> None:
    h = hash_password("pw", n=FAST_N)
    with pytest.raises(ConfigError, match="twice"):
        UserDb.parse(f"a:{h}\na:{h}\n")


def test_users_file_open_to_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"a:{hash_password('pw', n=FAST_N)}\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        UserDb.load(str(path))
    path.chmod(0o640)  # the group neither: the same rule as every file holding a secret
    with pytest.raises(ConfigError, match="chmod 600"):
        UserDb.load(str(path))
    path.chmod(0o600)
    assert UserDb.load(str(path)).verify(b"a", b"pw") == "a"
    with pytest.raises(ConfigError, match="cannot read"):
        UserDb.load(str(tmp_path / "missing"))


def test_tls_context_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        server_context(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="cannot load"):
        server_context(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))


# --- policy helpers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "count"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\nC: 3\r\n", 2),
        (b"A: 1\r\n folded\r\n\tagain\r\nB: 2\r\n\r\n", 2),
        (b"A: 1\nB: 2\n\nC: 3\n", 2),  # bare LF
        (b"A: 1\r\nB: 2", 2),  # no body, no final newline
        (b"\r\nA: 1\r\n", 0),
        (b"", 0),
    ],
)
def test_header_count(body: bytes, count: int) -> None:
    assert header_count(body, 1000) == count


def test_header_count_stops_early() -> None:
    assert header_count(b"X: 1\r\n" * 1_000_000, 10) == 11


@pytest.mark.parametrize(
    "addr",
    ["a\udcffb@example.org", "a\x00b@example.org", "a\x7fb@example.org", "a b@example.org"],
)
def test_undecodable_or_control_characters_are_bad_addresses(addr: str) -> None:
    assert not valid_address(addr, allow_empty=False)


def test_utf8_addresses_are_fine() -> None:
    assert valid_address("jöran@example.org", allow_empty=False)


def test_client_keys() -> None:
    def key(ip: str) -> str:
        parsed = parse_peer((ip, 1))
        assert parsed is not None
        return client_key(parsed)

    assert key("192.0.2.7") == "192.0.2.7"
    assert key("2001:db8:1:2:3:4:5:6") == key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert key("::ffff:192.0.2.7") == "192.0.2.7"
    assert parse_peer(None) is None and parse_peer(("not-an-ip", 1)) is None


# --- SmtpIngress decisions (no SMTP session, no Raft) ----------------------------


class _NeverSubmits:
    async def submit(self, cmd: Any) -> Any:
        raise AssertionError("MAIL must not submit")

    def is_leader(self) -> bool:
        return True


def _ingress(clock: ManualClock, **limits: Any) -> SmtpIngress:
    return SmtpIngress(
        _NeverSubmits(),
        clock,
        lambda n: b"\0" * n,
        "n1",
        "test.local",
        ["127.0.0.0/8"],
        100,
        lambda: 0.0,
        limits=IngressLimits(**limits),
    )


def _mail(ing: SmtpIngress, ip: str, authenticated: bool = False) -> str:
    session = Session(asyncio.new_event_loop())
    try:
        session.peer = (ip, 40000)
        session.authenticated = authenticated
        return asyncio.run(ing.handle_MAIL(None, session, Envelope(), "a@example.org", []))  # type: ignore[arg-type]
    finally:
        session.loop.close()


def test_authenticated_clients_relay_from_anywhere() -> None:
    ing = _ingress(ManualClock())
    assert _mail(ing, "192.0.2.7").startswith("554 5.7.1")
    assert _mail(ing, "192.0.2.7", authenticated=True).startswith("250")


def test_message_rate_per_client() -> None:
    clock = ManualClock()
    ing = _ingress(clock, message_rate_per_min=3)
    assert [_mail(ing, "127.0.0.9")[:3] for _ in range(4)] == ["250"] * 3 + ["450"]
    assert _mail(ing, "127.0.0.9").startswith("450 4.7.1")
    assert _mail(ing, "127.0.0.10").startswith("250")
    clock.advance(20)
    assert _mail(ing, "127.0.0.9").startswith("250")


def test_connection_rate_and_concurrency_per_client() -> None:
    clock = ManualClock()
    ing = _ingress(clock, connection_rate_per_min=3, max_connections_per_client=2)

    def open_(port: int) -> tuple[str | None, str | None]:
        return asyncio.run(ing.open_connection(("127.0.0.9", port)))

    (k1, r1), (k2, r2), (k3, r3) = open_(1), open_(2), open_(3)
    assert (r1, r2) == (None, None) and k1 == k2 == "127.0.0.9"
    assert k3 is None and r3 is not None and r3.startswith("421 4.7.0")
    assert k1 is not None
    ing.close_connection(k1)
    k4, r4 = open_(4)  # a free slot, but the rate is used up
    assert k4 is None and r4 is not None and "too many connections" in r4
    clock.advance(20)
    k5, r5 = open_(5)
    assert r5 is None and k5 == "127.0.0.9"


# --- settings --------------------------------------------------------------------


@pytest.fixture
def good(tmp_path: Path) -> dict[str, Any]:
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef-cluster-secret\n")
    secret.chmod(0o600)
    return {
        "node_id": "n1",
        "data_dir": str(tmp_path / "data"),
        "raft_addr": "127.0.0.1:7001",
        "peers": "127.0.0.1:7002,127.0.0.1:7003",
        "cluster_secret_file": str(secret),
    }


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"smtp_tls_cert": "c.pem"}, "smtp_tls_cert"),
        ({"smtp_tls_key": "k.pem"}, "smtp_tls_cert"),
        ({"smtp_users_file": "users"}, "smtp_users_file"),
        ({"smtps_addr": "127.0.0.1:4650"}, "smtps_addr"),
        ({"smtp_tls_cert": "c", "smtp_tls_key": "k", "smtps_addr": "nope"}, "smtps_addr"),
        ({"smtp_tls_cert": "c", "smtp_tls_key": "k", "smtps_addr": "127.0.0.1:2525"}, "smtps_addr"),
        ({"client_connection_rate_per_min": 0}, "client_connection_rate_per_min"),
        ({"client_message_rate_per_min": -1}, "client_message_rate_per_min"),
        ({"client_max_connections": 0}, "client_max_connections"),
        ({"max_header_count": 0}, "max_header_count"),
        ({"max_commands_per_session": 0}, "max_commands_per_session"),
        ({"smtp_idle_timeout_s": 0}, "smtp_idle_timeout_s"),
    ],
)
def test_bad_submission_settings_name_their_key(
    good: dict[str, Any], extra: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=key):
        NodeConfig.load(None, {**good, **extra})


def test_submission_settings_load(good: dict[str, Any]) -> None:
    cfg = NodeConfig.load(
        None,
        {
            **good,
            "smtp_tls_cert": "c.pem",
            "smtp_tls_key": "k.pem",
            "smtp_users_file": "users",
            "smtps_addr": "127.0.0.1:4650",
            "client_message_rate_per_min": "10",
        },
    )
    assert cfg.smtps_addr == "127.0.0.1:4650" and cfg.client_message_rate_per_min == 10
    assert NodeConfig.load(None, good).client_connection_rate_per_min == 600


def test_hash_password_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import getpass

    from mqnode.smtp import auth as smtpauth

    monkeypatch.setattr(getpass, "getpass", lambda prompt="": "pw")
    assert smtpauth.main(["alice@x.test"]) == 0
    line = capsys.readouterr().out.strip()
    assert UserDb.parse(line).verify(b"alice@x.test", b"pw") == "alice@x.test"
    assert smtpauth.main(["bad:name"]) == 2
