"""Principals files, bearer checks, the role table, and the audit trail's state."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from mqnode.access.policy import ROUTE_ROLES
from mqnode.access.principals import GRANTS, ROLES, Principals, new_principal, parse
from mqnode.cli.access import since_ms
from mqnode.errors import ConfigError
from mqnode.passwords import hash_password
from mqnode.spool.commands import Audit
from mqnode.spool.store import QueueStore

from .kit import T0, Transcript

CHEAP = hash_password("s3cret", n=2**4)  # a fast hash for tests


def _file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "principals.toml"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return str(path)


def test_a_new_principal_authenticates_with_its_token_and_nothing_else(tmp_path: Path) -> None:
    token, entry = new_principal("app-1", ["submit", "view"])
    principals = Principals.load(_file(tmp_path, entry), "the-admin-token")

    async def check(header: str) -> str | None:
        found = await principals.authenticate(header)
        return None if found is None else found.name

    assert asyncio.run(check(f"Bearer {token}")) == "app-1"
    assert asyncio.run(check(f"Bearer {token}")) == "app-1"  # remembered: no second scrypt
    assert asyncio.run(check(f"Bearer {token}x")) is None
    assert asyncio.run(check(f"Bearer nobody.{token.partition('.')[2]}")) is None
    assert asyncio.run(check(f"Basic {token}")) is None
    assert asyncio.run(check("Bearer the-admin-token")) == "admin-token"
    assert asyncio.run(check("Bearer " + "x" * 5000)) is None
    assert asyncio.run(check("")) is None


def test_roles_grant_what_the_docs_say() -> None:
    assert GRANTS["admin"] == frozenset(ROLES)
    assert GRANTS["operate"] == {"operate", "view"}
    assert GRANTS["submit"] == {"submit"} and GRANTS["view"] == {"view"}


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("[[principal]]\nname = 'a'\nroles = ['submit']\n", "key"),
        (f"[[principal]]\nname = 'a b'\nkey = '{CHEAP}'\nroles = ['submit']\n", "name"),
        (f"[[principal]]\nname = 'a'\nkey = '{CHEAP}'\nroles = ['root']\n", "roles"),
        (f"[[principal]]\nname = 'a'\nkey = '{CHEAP}'\nroles = []\n", "roles"),
        (f"[[principal]]\nname = 'a'\nkey = '{CHEAP}'\nroles = ['view']\nextra = 1\n", "extra"),
        (
            f"[[principal]]\nname = 'a'\nkey = '{CHEAP}'\nroles = ['view']\n" * 2,
            "appears twice",
        ),
        (f"[[principal]]\nname = 'admin-token'\nkey = '{CHEAP}'\nroles = ['view']\n", "admin"),
        ("[user]\nname = 'a'\n", "unknown table"),
        ("not toml = = =", "not TOML"),
        (
            f"[[principal]]\nname = 'a'\nkey = '{CHEAP}'\nroles = ['view']\napi_rate_per_min = 0\n",
            "api_rate_per_min",
        ),
    ],
)
def test_a_bad_file_is_one_line_naming_what(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, "principals_file x")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_file_others_can_read_is_refused(tmp_path: Path) -> None:
    _, entry = new_principal("a", ["view"])
    with pytest.raises(ConfigError, match="chmod 600"):
        Principals.load(_file(tmp_path, entry, 0o644), "")


def test_every_role_in_the_table_is_a_role() -> None:
    for rule in ROUTE_ROLES.values():
        for role in rule.values() if isinstance(rule, dict) else [rule]:
            assert role in (*ROLES, "public", "status"), rule


def test_since_accepts_durations_dates_and_milliseconds() -> None:
    now = 1_800_000_000.0
    assert since_ms("", now) == 0
    assert since_ms("7d", now) == int((now - 7 * 86400) * 1000)
    assert since_ms("90m", now) == int((now - 5400) * 1000)
    assert since_ms("2026-12-01", now) == 1_796_083_200_000
    assert since_ms("1234", now) == 1234
    with pytest.raises(ConfigError, match="--since"):
        since_ms("yesterday", now)


def test_audit_records_list_in_order_and_expire_with_their_retention(
    tx: Transcript, store: QueueStore
) -> None:
    day = 86_400_000
    tx.one(Audit(T0, "boss", "queue/delete", '{"ids":["Q1"]}', "n1", 30 * day))
    tx.one(Audit(T0, "ops", "queue/hold", '{"ids":["Q2"]}', "n2", 30 * day))
    tx.one(Audit(T0 + day, "ops", "shaping", "{}", "n1", 30 * day))
    assert [r["principal"] for r in store.audit_records(0)] == ["boss", "ops", "ops"]
    assert [r["action"] for r in store.audit_records(0, "ops")] == ["queue/hold", "shaping"]
    assert [r["action"] for r in store.audit_records(T0 + 1)] == ["shaping"]
    # 31 days on: the first two are past their 30 days and go as the next record applies.
    assert tx.one(Audit(T0 + 31 * day, "boss", "dkim/reload", "", "n3", 30 * day))[0] == "ok"
    assert [r["action"] for r in store.audit_records(0)] == ["shaping", "dkim/reload"]
    assert tx.one(Audit(T0, "x", "y", "z" * 5000, "n1", day))[0] == "rejected"


def test_principals_that_may_submit_log_in_to_smtp_with_their_secret(tmp_path: Path) -> None:
    from mqnode.smtp.auth import UserDb

    token, entry = new_principal("app", ["submit"])
    _, viewer = new_principal("eyes", ["view"])
    path = _file(tmp_path, entry + "\n" + viewer)
    users = tmp_path / "users"
    users.write_text(f"alice:{CHEAP}\n", encoding="utf-8")
    os.chmod(users, 0o600)
    db = UserDb.for_node(str(users), path)
    assert db is not None and len(db) == 2  # alice and app; eyes may not submit
    secret = token.partition(".")[2].encode()
    assert db.verify(b"app", secret) == "app"
    assert db.verify(b"eyes", secret) is None
    assert db.verify(b"alice", b"s3cret") == "alice"
    assert UserDb.for_node("", "") is None
    users.write_text(f"app:{CHEAP}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="also a login"):
        UserDb.for_node(str(users), path)
