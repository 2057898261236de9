"""Run the `mqnode` command line as a real process, bounded in time."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

CLI_TIMEOUT_S = 20.0

RunCli = Callable[..., subprocess.CompletedProcess[str]]


class CliTimeout(AssertionError):
    """The command was still running at its deadline (it has been killed)."""


def run_cli(
    *args: str, timeout_s: float = CLI_TIMEOUT_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m mqnode.cli ARGS...` with captured output.

    A process still running after `timeout_s` is killed by PID and CliTimeout is
    raised, so a node that starts when it should have refused cannot hang a test.
    """
    cmd = [sys.executable, "-m", "mqnode.cli", *args]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        tail = "\n".join(err.splitlines()[-15:])
        raise CliTimeout(
            f"mqnode {' '.join(args)} still running after {timeout_s:.0f}s; stderr:\n{tail}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def flags(args: dict[str, str]) -> list[str]:
    """{"node-id": "n1", ...} -> ["--node-id", "n1", ...]"""
    out: list[str] = []
    for key, value in args.items():
        out += [f"--{key}", value]
    return out
