"""bench.postfix pure parts: config rendering, skip reasons, the sink counter, the table.

Runs without Postfix: nothing here starts a process except the optional
`postconf` check, which is skipped when Postfix is not installed.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import postfix
from bench.smtptools import sink_count


def parse_main_cf(text: str) -> dict[str, str]:
    pairs = (line.split(" = ", 1) for line in text.splitlines())
    return {k: v for k, v in pairs}


def fake_tools(bindir: Path, names: tuple[str, ...]) -> str:
    bindir.mkdir()
    for name in names:
        tool = bindir / name
        tool.write_text("#!/bin/sh\nexit 1\n")
        tool.chmod(0o755)
    return str(bindir)


# -- config rendering ----------------------------------------------------------------------


def test_main_cf_keeps_everything_under_base_and_on_loopback(tmp_path: Path) -> None:
    cf = parse_main_cf(postfix.render_main_cf(tmp_path, 2525, 7))
    for key in ("queue_directory", "data_directory", "maillog_file"):
        assert cf[key].startswith(str(tmp_path)), key
    assert cf["maillog_file_prefixes"] == str(tmp_path)
    assert cf["inet_interfaces"] == "127.0.0.1"
    assert cf["mynetworks"] == "127.0.0.0/8"
    assert cf["relayhost"] == "[127.0.0.1]:2525"
    assert cf["default_destination_concurrency_limit"] == "7"
    assert cf["smtp_destination_concurrency_limit"] == "7"
    assert cf["in_flow_delay"] == "0"


def test_main_cf_never_uses_dns_or_local_delivery(tmp_path: Path) -> None:
    cf = parse_main_cf(postfix.render_main_cf(tmp_path, 2525, 20))
    assert cf["disable_dns_lookups"] == "yes"
    assert cf["smtp_dns_support_level"] == "disabled"
    assert cf["smtp_host_lookup"] == "native"
    assert cf["smtpd_peername_lookup"] == "no"
    assert cf["mydestination"] == ""
    assert cf["alias_maps"] == ""
    assert cf["local_transport"].startswith("error:")


def test_main_cf_keeps_default_fsync_behaviour(tmp_path: Path) -> None:
    # The row is the durability bar: nothing may turn queue-file syncing off.
    text = postfix.render_main_cf(tmp_path, 2525, 20)
    assert "sync" not in text


def test_master_cf_listens_only_on_the_given_loopback_port() -> None:
    lines = [line.split() for line in postfix.render_master_cf(2626).splitlines()]
    inet = [f for f in lines if f[1] == "inet"]
    assert inet == [["127.0.0.1:2626", "inet", "n", "-", "n", "-", "-", "smtpd"]]
    assert all(f[4] == "n" for f in lines), "chroot must be off"
    names = {f[0] for f in lines}
    assert {"cleanup", "qmgr", "rewrite", "smtp", "bounce", "postlog"} <= names
    assert "local" not in names


@pytest.mark.skipif(
    shutil.which("postconf", path="/usr/sbin:/usr/local/sbin") is None,
    reason="postconf not installed",
)
def test_postconf_knows_every_parameter(tmp_path: Path) -> None:
    postfix.write_config(tmp_path, postfix.render_main_cf(tmp_path, 2525, 20), 2626)
    postconf = shutil.which("postconf", path="/usr/sbin:/usr/local/sbin")
    assert postconf is not None
    for flag in ("-n", "-M"):
        res = subprocess.run(
            [postconf, "-c", str(tmp_path), flag], capture_output=True, text=True, timeout=30
        )
        assert res.returncode == 0, res.stderr
        assert "warning" not in res.stderr, res.stderr


# -- skip reasons --------------------------------------------------------------------------


def test_nothing_installed_names_every_missing_tool(tmp_path: Path) -> None:
    empty = fake_tools(tmp_path / "bin", ())
    why = postfix.available(empty)
    assert why is not None
    assert "smtp-source" in why and "smtp-sink" in why and "postfix" in why
    only_tools = postfix.available(empty, instance=False)
    assert only_tools is not None and "postfix" not in only_tools.replace("install postfix", "")


def test_tools_without_postfix_allow_only_the_ceiling(tmp_path: Path) -> None:
    path = fake_tools(tmp_path / "bin", ("smtp-source", "smtp-sink"))
    assert postfix.available(path, instance=False) is None
    why = postfix.available(path)
    assert why is not None and "postfix" in why


def test_postfix_instance_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fake_tools(tmp_path / "bin", ("smtp-source", "smtp-sink", "postfix"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    why = postfix.available(path)
    assert why is not None and "root" in why
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert postfix.available(path) is None


def test_reference_rows_skip_cleanly_without_postfix(tmp_path: Path) -> None:
    rows = postfix.reference_rows(10, 2, 100, path=fake_tools(tmp_path / "bin", ()))
    assert [r.name for r in rows] == [
        "smtp-source -> smtp-sink",
        "Postfix accept",
        "Postfix end to end",
    ]
    for r in rows:
        assert math.isnan(r.rate) and r.note.startswith("skipped: not installed")
    text = postfix.table(rows)
    assert text.count("| - | - |") == 3


# -- smtp-sink counter ---------------------------------------------------------------------


def test_sink_count_reads_the_last_complete_counter() -> None:
    assert sink_count(b"") == 0
    assert sink_count(b"sess=1 quit=1 mesg=0\r") == 0
    out = b"sess=0 quit=0 mesg=1\rsess=1 quit=1 mesg=1\rsess=1 quit=1 mesg=12\r"
    assert sink_count(out) == 12
    # A torn last line (read mid-write) does not count.
    assert sink_count(out + b"sess=2 quit=2 mesg=1") == 12
    # The tail may start mid-line.
    assert sink_count(b"=3 mesg=41\rsess=4 quit=4 mesg=42\r") == 42
