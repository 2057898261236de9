"""SigningProcess: big messages signed in a child process, with the node's keys."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dkim
import pytest

from mqnode.config import NodeConfig
from mqnode.signing.dkim_signer import DkimSigner, SigningError
from mqnode.signing.keys import DkimKey, keygen
from mqnode.signing.signing_process import SigningProcess
from tests.support.procs import alive

LINE = b"The quick brown fox jumps over the lazy dog, again and again.  \r\n"


def _message(mib: int) -> bytes:
    head = b"From: a@example.org\r\nTo: b@x.test\r\nSubject: hi\r\n\r\n"
    return head + LINE * (mib * 1024 * 1024 // len(LINE))


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> DkimKey:
    return keygen("example.org", "s1", "rsa", 2048, tmp_path_factory.mktemp("keys"))


def _cfg(key: DkimKey, tmp: Path) -> NodeConfig:
    return NodeConfig(node_id="n1", data_dir=str(tmp), dkim_keys=[f"example.org:s1:{key.path}"])


def test_the_child_signs_as_the_node_would(key: DkimKey, tmp_path: Path) -> None:
    message = _message(2)
    signing = SigningProcess(_cfg(key, tmp_path))
    try:
        signatures, domains = asyncio.run(signing.sign(message, 1_700_000_000))
    finally:
        signing.close()
    assert domains == ("example.org",)
    here = DkimSigner.from_config(_cfg(key, tmp_path)).sign(message, 1_700_000_000)
    assert (signatures, domains) == here  # RSA PKCS#1 v1.5 signatures are deterministic
    dns = lambda name, timeout=5: key.txt_record().encode()  # noqa: E731
    assert dkim.DKIM(signatures + message).verify(dnsfunc=dns)


def test_this_process_keeps_running_while_the_child_signs(key: DkimKey, tmp_path: Path) -> None:
    # Signed here, 16 MiB kept another thread of the process from running for ~0.7 s
    # (25 MiB: 1.1 s), the node's Raft thread among them (election timeout 400-1400 ms).
    message = _message(16)
    signing = SigningProcess(_cfg(key, tmp_path))
    gaps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    try:
        asyncio.run(signing.sign(_message(1), 0))  # the child is up
        thread = threading.Thread(target=tick)
        thread.start()
        try:
            _, domains = asyncio.run(signing.sign(message, 0))
        finally:
            stop.set()
            thread.join()
    finally:
        signing.close()
    assert domains == ("example.org",)
    assert max(gaps) < 0.4, max(gaps)


def test_a_child_that_dies_refuses_that_message_and_the_next_gets_a_new_one(
    key: DkimKey, tmp_path: Path
) -> None:
    signing = SigningProcess(_cfg(key, tmp_path))

    async def killed_mid_way() -> None:
        await signing.sign(_message(1), 0)
        (child,) = multiprocessing.active_children()
        task = asyncio.ensure_future(signing.sign(_message(16), 0))
        await asyncio.sleep(0.2)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        with pytest.raises(SigningError, match="signing process is gone"):
            await task

    try:
        asyncio.run(killed_mid_way())
        assert asyncio.run(signing.sign(_message(1), 0))[1] == ("example.org",)
    finally:
        signing.close()


def test_the_child_exits_with_the_node(key: DkimKey, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, multiprocessing, sys
        from mqnode.config import NodeConfig
        from mqnode.signing.signing_process import SigningProcess
        if __name__ == "__main__":
            cfg = NodeConfig(node_id="n1", data_dir={str(tmp_path)!r},
                             dkim_keys=["example.org:s1:{key.path}"])
            s = SigningProcess(cfg)
            asyncio.run(s.sign(b"From: a@example.org\\r\\n\\r\\nhi\\r\\n" * 100_000, 0))
            print(multiprocessing.active_children()[0].pid, flush=True)
            sys.stdin.read()
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    ) as parent:
        try:
            assert parent.stdout is not None
            child = int(parent.stdout.readline())
            parent.kill()  # kill -9: no chance to stop its child
            parent.wait(timeout=10)
            deadline = time.monotonic() + 10
            while alive(child) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not alive(child), "the signing process outlived the node"
        finally:
            if parent.poll() is None:
                parent.kill()
