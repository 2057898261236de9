"""The command line's first-hour behaviour: usage, help, switches, one-line errors."""

from __future__ import annotations

import socket
from dataclasses import fields
from pathlib import Path

import pytest

from mqnode import cli
from mqnode.cli import text as views
from mqnode.config import NodeConfig


def test_no_arguments_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mqnode") and "dev-sink" in err and "status" in err


def test_run_help_gives_every_flag_a_line_and_its_default() -> None:
    text = cli.build_parser()._subparsers._group_actions[0].choices["run"].format_help()  # type: ignore[union-attr]
    text = " ".join(text.split())
    for f in fields(NodeConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        help_text = " ".join(f.metadata["help"].split())
        assert help_text in text, f.name
    assert "--join, --no-join" in text and "--no-delivery-enabled" in text
    assert "(default: 127.0.0.1:2525)" in text and "(default: on)" in text


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["--join", "1"], ["--join"]),
        (["--delivery-enabled", "0"], ["--no-delivery-enabled"]),
        (["--fault-injection=true"], ["--fault-injection"]),
        (["--join", "--peers", "a:1"], ["--join", "--peers", "a:1"]),
        (["--node-id", "1"], ["--node-id", "1"]),  # not a switch: left alone
    ],
)
def test_switches_take_the_earlier_value_form(given: list[str], expected: list[str]) -> None:
    assert cli.switches_as_flags(given) == expected


def test_switch_flags_parse_to_booleans() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["run", "--no-delivery-enabled", "--join"])
    assert args.delivery_enabled is False and args.join is True
    assert parser.parse_args(["run"]).join is None  # left to the TOML file or the default


def test_status_defaults_to_the_local_admin_endpoint() -> None:
    args = cli.build_parser().parse_args(["status"])
    assert args.admin == cli.DEFAULT_ADMIN


def _run_args(tmp_path: Path, **over: str) -> list[str]:
    secret = tmp_path / "s.secret"
    secret.write_text("x" * 32)
    secret.chmod(0o600)
    base = {
        "--node-id": "n1",
        "--data-dir": str(tmp_path / "d"),
        "--raft-addr": "127.0.0.1:1",
        "--smtp-addr": "127.0.0.1:1",
        "--admin-addr": "127.0.0.1:1",
        "--cluster-secret-file": str(secret),
    }
    base.update(over)
    return ["run", *(x for kv in base.items() for x in kv)]


def test_a_listen_port_in_use_is_one_line_and_leaves_the_data_dir_unstamped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = []
        for _ in range(2):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            free.append(s)
        smtp, admin = (f"127.0.0.1:{s.getsockname()[1]}" for s in free)
        for s in free:
            s.close()
        argv = _run_args(
            tmp_path,
            **{"--raft-addr": f"127.0.0.1:{port}", "--smtp-addr": smtp, "--admin-addr": admin},
        )
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "raft_addr: cannot listen on" in err and "in use" in err
    assert not (tmp_path / "d" / "node.json").exists()


def test_a_data_dir_that_is_a_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "d").write_text("not a dir")
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(f"127.0.0.1:{s.getsockname()[1]}")
    argv = _run_args(
        tmp_path, **{"--raft-addr": ports[0], "--smtp-addr": ports[1], "--admin-addr": ports[2]}
    )
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory" in err


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604])
def test_every_secret_file_follows_one_mode_rule(tmp_path: Path, mode: int) -> None:
    from mqnode.errors import ConfigError

    cfg = NodeConfig(node_id="n1", data_dir=str(tmp_path), raft_addr="127.0.0.1:1")
    for key in ("cluster_secret_file", "admin_token_file"):
        path = tmp_path / key
        path.write_text("y" * 32)
        path.chmod(mode)
        setattr(cfg, key, str(path))
    with pytest.raises(ConfigError, match=r"cluster_secret_file: .* chmod 600"):
        cfg.read_secret()
    with pytest.raises(ConfigError, match=r"admin_token_file: .* chmod 600"):
        cfg.admin_token()
    for key in ("cluster_secret_file", "admin_token_file"):
        (tmp_path / key).chmod(0o600)
    assert cfg.read_secret() and cfg.admin_token()


def test_queue_show_text_names_attempts_last_reply_and_next_attempt() -> None:
    m = {
        "id": "Q1",
        "state": "deferred",
        "received_ms": 1_000_000,
        "mail_from": "a@x.test",
        "size": 1234,
        "message_id": "<m1@x.test>",
        "client": "127.0.0.1",
        "accepted_by": "n1",
        "attempts": 2,
        "next_attempt_ms": 1_600_000,
        "recipients": [
            {"address": "b@y.test", "state": "pending", "attempts": 2, "last_reply": "451 busy"},
            {"address": "c@y.test", "state": "delivered", "attempts": 1, "last_reply": "250 ok"},
        ],
    }
    text = views.show_text(m, now_s=1_300.0)
    assert "next attempt  1970-01-01 00:26:40 UTC (in 5 min)" in text
    assert "b@y.test  pending, 2 attempts" in text and "last reply: 451 busy" in text
    assert "c@y.test  delivered, 1 attempt\n" in text
    assert "attempts      2" in text
    done = {**m, "recipients": [m["recipients"][1]]}  # type: ignore[list-item]
    assert "nothing pending" in views.show_text(done, now_s=1_300.0)
