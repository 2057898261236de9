"""NodeConfig: every bad setting is a ConfigError that names its key; TOML and flags agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mqnode.config import NodeConfig, parse_hostport
from mqnode.errors import ConfigError
from mqnode.tls import relay_client_context

SECRET = "0123456789abcdef-cluster-secret"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def good(tmp_path: Path, secret_file: Path) -> dict[str, Any]:
    return {
        "node_id": "node-1",
        "data_dir": str(tmp_path / "data"),
        "raft_addr": "127.0.0.1:7001",
        "peers": "127.0.0.1:7002, 127.0.0.1:7003",
        "cluster_secret_file": str(secret_file),
    }


def test_good_overrides_load(good: dict[str, Any]) -> None:
    cfg = NodeConfig.load(None, good)
    assert cfg.node_id == "node-1"
    assert cfg.peers == ["127.0.0.1:7002", "127.0.0.1:7003"]
    assert cfg.read_secret() == SECRET
    assert cfg.data_path.is_absolute()


def test_none_overrides_are_ignored(good: dict[str, Any]) -> None:
    cfg = NodeConfig.load(None, {**good, "smtp_addr": None, "heartbeat_ms": None})
    assert (cfg.smtp_addr, cfg.heartbeat_ms) == (NodeConfig.smtp_addr, NodeConfig.heartbeat_ms)


def test_integers_from_flags_are_coerced(good: dict[str, Any]) -> None:
    assert NodeConfig.load(None, {**good, "max_recipients": "42"}).max_recipients == 42


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("node_id", ""),
        ("node_id", "node 1"),
        ("node_id", "node/1"),
        ("data_dir", ""),
        ("raft_addr", ""),
        ("raft_addr", "127.0.0.1"),
        ("raft_addr", ":7001"),
        ("raft_addr", "127.0.0.1:"),
        ("raft_addr", "127.0.0.1:http"),
        ("raft_addr", "127.0.0.1:0"),
        ("raft_addr", "127.0.0.1:65536"),
        ("smtp_addr", "localhost"),
        ("admin_addr", "localhost:-1"),
        ("peers", "127.0.0.1:7001"),
        ("peers", "127.0.0.1:7002,127.0.0.1:7001"),
        ("peers", "127.0.0.1:7002,127.0.0.1:7002"),
        ("peers", "nohostport"),
        ("peers", 7002),
        ("peers", ["127.0.0.1:7002", 7003]),
        ("relay_host", "smtp.example.com"),
        ("dns_server", "127.0.0.1:x"),
        ("cluster_secret_file", ""),
        ("allowed_networks", "10.0.0.0/33"),
        ("allowed_networks", ["127.0.0.0/8", "not-a-network"]),
        ("max_message_bytes", 0),
        ("max_recipients", -1),
        ("max_recipients", "many"),
        ("max_recipients", True),
        ("commit_timeout_ms", 0),
        ("heartbeat_ms", 0),
        ("heartbeat_ms", 300),
        ("replication_batch_ms", -1),
        ("replication_batch_ms", 100),  # not below heartbeat_ms (100)
        ("retry_max_s", 0),
        ("delivery_recipient_limit", 0),
        ("state_map_size_mb", 0),
        ("election_timeout_min_ms", 1400),
        ("hostname", 5),
        ("join", 2),
        ("destination_concurrency_limits", "gmail.com"),
        ("destination_concurrency_limits", "gmail.com=0"),
        ("destination_concurrency_limits", "gmail.com=two"),
        ("destination_concurrency_limits", "=3"),
        ("destination_concurrency_limits", "a.test=2,A.test.=3"),
    ],
)
def test_bad_value_names_its_key(good: dict[str, Any], key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        NodeConfig.load(None, {**good, key: value})
    assert key in str(info.value)


def test_missing_node_id(good: dict[str, Any]) -> None:
    del good["node_id"]
    with pytest.raises(ConfigError, match="node_id"):
        NodeConfig.load(None, good)


def test_join_needs_the_current_members_as_peers(good: dict[str, Any]) -> None:
    assert NodeConfig.load(None, {**good, "join": "1"}).join == 1
    with pytest.raises(ConfigError, match="join: needs peers"):
        NodeConfig.load(None, {**good, "join": 1, "peers": ""})


def test_unknown_key_is_named(good: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="raft_adress"):
        NodeConfig.load(None, {**good, "raft_adress": "127.0.0.1:1"})


def test_parse_hostport_accepts_bracketed_ipv6() -> None:
    assert parse_hostport("[::1]:2525", "smtp_addr") == ("::1", 2525)
    assert parse_hostport("mx.example.com:25", "relay_host") == ("mx.example.com", 25)


# -- the secret file ---------------------------------------------------------------------------


def test_missing_secret_file(good: dict[str, Any], tmp_path: Path) -> None:
    cfg = NodeConfig.load(None, {**good, "cluster_secret_file": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="cluster_secret_file"):
        cfg.read_secret()


@pytest.mark.parametrize("mode", [0o604, 0o644, 0o666, 0o601])
def test_world_accessible_secret_file(good: dict[str, Any], secret_file: Path, mode: int) -> None:
    secret_file.chmod(mode)
    cfg = NodeConfig.load(None, good)
    with pytest.raises(ConfigError, match="cluster_secret_file"):
        cfg.read_secret()


@pytest.mark.parametrize("text", ["", "short", "   fifteen-chars\n", " " * 40])
def test_short_secret(good: dict[str, Any], secret_file: Path, text: str) -> None:
    secret_file.write_text(text)
    cfg = NodeConfig.load(None, good)
    with pytest.raises(ConfigError, match="cluster_secret_file"):
        cfg.read_secret()


def test_sixteen_character_secret_is_enough(good: dict[str, Any], secret_file: Path) -> None:
    secret_file.write_text("x" * 16)
    assert NodeConfig.load(None, good).read_secret() == "x" * 16


# -- TOML files --------------------------------------------------------------------------------


def _toml(good: dict[str, Any]) -> str:
    peers = ", ".join(f'"{p.strip()}"' for p in good["peers"].split(","))
    return "\n".join(
        [
            f'node_id = "{good["node_id"]}"',
            f'data_dir = "{good["data_dir"]}"',
            f'raft_addr = "{good["raft_addr"]}"',
            f"peers = [{peers}]",
            f'cluster_secret_file = "{good["cluster_secret_file"]}"',
            'smtp_addr = "127.0.0.1:2600"',
            "heartbeat_ms = 50",
            'allowed_networks = ["10.0.0.0/8"]',
            "",
        ]
    )


def test_toml_file_with_the_same_keys_loads(good: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(_toml(good))
    from_file = NodeConfig.load(str(path), {})
    from_flags = NodeConfig.load(
        None,
        {
            **good,
            "smtp_addr": "127.0.0.1:2600",
            "heartbeat_ms": "50",
            "allowed_networks": "10.0.0.0/8",
        },
    )
    assert from_file == from_flags


def test_flags_override_toml(good: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(_toml(good))
    cfg = NodeConfig.load(str(path), {"smtp_addr": "127.0.0.1:2700", "node_id": None})
    assert cfg.smtp_addr == "127.0.0.1:2700"
    assert cfg.node_id == "node-1"
    assert cfg.heartbeat_ms == 50


def test_bad_value_in_toml_names_its_key(good: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(_toml(good) + 'delivery_concurrency = "lots"\n')
    with pytest.raises(ConfigError, match="delivery_concurrency"):
        NodeConfig.load(str(path), {})


def test_unknown_key_in_toml_is_named(good: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(_toml(good) + "smtp_port = 25\n")
    with pytest.raises(ConfigError, match="smtp_port"):
        NodeConfig.load(str(path), {})


def test_unreadable_or_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        NodeConfig.load(str(tmp_path / "missing.toml"), {})
    bad = tmp_path / "bad.toml"
    bad.write_text("node_id = \n")
    with pytest.raises(ConfigError, match="--config"):
        NodeConfig.load(str(bad), {})


# --- relay host login ------------------------------------------------------------------


def _auth_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "relay-auth"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_relay_login_is_user_and_password(good: dict[str, Any], tmp_path: Path) -> None:
    auth = _auth_file(tmp_path, "mailer@example.org:pa:ss word\n")
    cfg = NodeConfig.load(
        None, {**good, "relay_host": "smarthost.test:587", "relay_auth_file": str(auth)}
    )
    assert cfg.relay_login() == ("mailer@example.org", "pa:ss word")  # split at the first ":"
    assert NodeConfig.load(None, good).relay_login() is None


@pytest.mark.parametrize(
    ("text", "mode", "said"),
    [
        ("user:secret\n", 0o644, "readable by others"),
        ("user:secret\n", 0o640, "readable by others"),
        ("no colon here\n", 0o600, "one line USER:PASSWORD"),
        (":secret\n", 0o600, "one line USER:PASSWORD"),
        ("user:\n", 0o600, "one line USER:PASSWORD"),
        ("", 0o600, "one line USER:PASSWORD"),
    ],
)
def test_bad_relay_auth_file_is_named(
    good: dict[str, Any], tmp_path: Path, text: str, mode: int, said: str
) -> None:
    auth = _auth_file(tmp_path, text, mode)
    cfg = NodeConfig.load(
        None, {**good, "relay_host": "smarthost.test:587", "relay_auth_file": str(auth)}
    )
    with pytest.raises(ConfigError, match=f"relay_auth_file: .*{said}"):
        cfg.relay_login()


def test_missing_relay_auth_file(good: dict[str, Any], tmp_path: Path) -> None:
    cfg = NodeConfig.load(
        None, {**good, "relay_host": "h.test:25", "relay_auth_file": str(tmp_path / "nope")}
    )
    with pytest.raises(ConfigError, match="relay_auth_file: cannot read"):
        cfg.relay_login()


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({"relay_auth_file": "/x"}, "need relay_host"),
        (
            {"relay_host": "h.test:25", "relay_tls_ca_file": "/ca.pem"},
            "relay_tls_ca_file: only used",
        ),
        ({"relay_host": "h.test:25", "relay_implicit_tls": 1}, "relay_implicit_tls: only used"),
        (
            {"relay_host": "h.test:465", "relay_auth_file": "/x", "relay_implicit_tls": 2},
            "relay_implicit_tls: expected true or false",
        ),
    ],
)
def test_relay_settings_that_do_not_go_together(
    good: dict[str, Any], extra: dict[str, Any], said: str
) -> None:
    with pytest.raises(ConfigError, match=said):
        NodeConfig.load(None, {**good, **extra})


def test_relay_ca_file_that_does_not_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="relay_tls_ca_file: no such file"):
        relay_client_context(str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="relay_tls_ca_file: cannot load"):
        relay_client_context(str(junk))


def test_destination_limits_are_per_lowercase_domain(good: dict[str, Any]) -> None:
    limits = "Gmail.COM.=2, b.test=7"
    cfg = NodeConfig.load(None, {**good, "destination_concurrency_limits": limits})
    assert cfg.destination_limits() == {"gmail.com": 2, "b.test": 7}
    assert NodeConfig.load(None, good).destination_limits() == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("yes", True), ("off", False)],
)
def test_switches_take_true_false_and_the_earlier_1_0(
    good: dict[str, Any], value: Any, expected: bool
) -> None:
    assert NodeConfig.load(None, {**good, "delivery_enabled": value}).delivery_enabled is expected


def test_every_setting_has_one_line_of_help() -> None:
    from dataclasses import fields

    for f in fields(NodeConfig):
        text = f.metadata.get("help", "")
        assert text and "\n" not in text and len(text) <= 80, f.name
