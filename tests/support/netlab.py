"""NetLab: each node in its own network namespace, with real faults from the kernel.

Layout (all made here, all removed by `close()`, also after a crash of an
earlier run: namespaces whose creator PID is gone are removed at start):

    hub namespace:  bridge br0
    node i:         namespace mqlab<pid>-<k>-n<i> (the k-th lab of this process)
                    r<i>  Raft link, 198.18.0.(i+1)/24 on br0 (RFC 2544 test range)
                    c<i>  client link, a veth to the root namespace:
                          198.19.K.(4i+2)/30 here, 198.19.K.(4i+1) on the root side
                    lo    127.0.0.1: the node's own delivery sink (relay host)

Clients (the test process, load generators, admin calls) reach every node over
its client link, whatever happens to the Raft links, so a test always sees
what each node answers. Faults act on the Raft links only:

* `link_down(i)` / `link_up(i)`: the Raft interface goes down (no RST: TCP
  connections time out as on a pulled cable);
* `drop(i, j)`: packets from i to j are dropped (one way; call both ways for
  a two-way cut), with iptables in i's namespace;
* `loss(i, p)`: each packet in or out of i's Raft link is dropped with
  probability p (iptables statistic);
* `delay(i, ms, jitter_ms)`: this kernel has no netem, so Raft connections
  that i opens go through a user-space delaying proxy in i's namespace
  (`tests/support/delayproxy.py`, iptables REDIRECT), which holds every chunk
  for ms +- jitter each way, in order;
* `heal()`: every rule flushed, every link up, every proxy stopped.

Needs root, iproute2 and iptables (scripts/test installs iptables with apt
when it can); `available()` says why not otherwise, for a skip.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "mqlab"
RAFT_NET = "198.18.0"
RAFT_PREFIX = 24
CLIENT_NET = "198.19"
SINK_PORT = 2600
DELAY_PROXY_PORT = 7999
PROXY_MARK = "0x6d71"  # the proxy's own connections carry it and are not redirected


def available() -> str | None:
    """None if namespaces and iptables can be used here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install iproute2 iptables)"
    probe = f"{PREFIX}probe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "netns", "exec", probe, "iptables", "-S"])
    except subprocess.CalledProcessError as exc:
        return f"namespaces or iptables unusable here: {exc.cmd}: {exc.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=20)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
    return done.stdout


def remove_stale() -> None:
    """Remove labs whose creating process is gone (a run killed before its cleanup)."""
    names = [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line]
    for name in names:
        if not name.startswith(PREFIX) or "-" not in name:
            continue
        pid = name[len(PREFIX) :].split("-")[0]  # mqlab<pid>-<k>-...
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


class NetLab:
    _made_in_process = itertools.count()  # several labs per test run: names never repeat

    def __init__(self, n: int, base_dir: Path) -> None:
        self.n = n
        self.base_dir = base_dir
        k = next(self._made_in_process)
        self.tag = f"{PREFIX}{os.getpid()}-{k}"
        self._root_if_stem = f"mq{os.getpid() % 100000}{k % 100}c"
        self.hub = f"{self.tag}-hub"
        self.block = random.Random().randrange(1, 250)  # the third octet of client links
        self._proxies: dict[int, subprocess.Popen[bytes]] = {}
        self._sinks: dict[int, subprocess.Popen[bytes]] = {}
        self._made: list[str] = []

    # -- addresses --------------------------------------------------------------------
    def ns(self, i: int) -> str:
        return f"{self.tag}-n{i}"

    def raft_ip(self, i: int) -> str:
        return f"{RAFT_NET}.{i + 1}"

    def client_ip(self, i: int) -> str:
        return f"{CLIENT_NET}.{self.block}.{4 * i + 2}"

    def client_net(self) -> str:
        """Every client link of this lab, as a CIDR (both ends)."""
        return f"{CLIENT_NET}.{self.block}.0/24"

    def _root_ip(self, i: int) -> str:
        return f"{CLIENT_NET}.{self.block}.{4 * i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns(i)]

    def sink_file(self, i: int) -> Path:
        return self.base_dir / f"sink-n{i + 1}.jsonl"

    # -- set-up and tear-down -------------------------------------------------------------
    def __enter__(self) -> NetLab:
        remove_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        _run(["ip", "netns", "add", self.hub])
        self._made.append(self.hub)
        hub = ["ip", "-n", self.hub]
        _run([*hub, "link", "add", "br0", "type", "bridge"])
        _run([*hub, "link", "set", "br0", "up"])
        for i in range(self.n):
            ns = self.ns(i)
            _run(["ip", "netns", "add", ns])
            self._made.append(ns)
            ip = ["ip", "-n", ns]
            _run([*ip, "link", "set", "lo", "up"])
            _run(["ip", "link", "add", f"r{i}", "netns", ns, "type", "veth",
                  "peer", "name", f"h{i}", "netns", self.hub])  # fmt: skip
            _run([*hub, "link", "set", f"h{i}", "master", "br0", "up"])
            _run([*ip, "addr", "add", f"{self.raft_ip(i)}/{RAFT_PREFIX}", "dev", f"r{i}"])
            _run([*ip, "link", "set", f"r{i}", "up"])
            root_if = f"{self._root_if_stem}{i}"
            _run(["ip", "link", "add", f"c{i}", "netns", ns, "type", "veth",
                  "peer", "name", root_if])  # fmt: skip
            _run(["ip", "addr", "add", f"{self._root_ip(i)}/30", "dev", root_if])
            _run(["ip", "link", "set", root_if, "up"])
            _run([*ip, "addr", "add", f"{self.client_ip(i)}/30", "dev", f"c{i}"])
            _run([*ip, "link", "set", f"c{i}", "up"])

    def start_sinks(self) -> None:
        """A recording sink on 127.0.0.1:SINK_PORT in every node's namespace."""
        for i in range(self.n):
            if i in self._sinks and self._sinks[i].poll() is None:
                continue
            log = open(self.base_dir / f"sink-n{i + 1}.log", "ab")  # noqa: SIM115
            self._sinks[i] = subprocess.Popen(
                [*self.exec_prefix(i), sys.executable, "-m", "mqnode.devtools.devsink",
                 "--listen", f"127.0.0.1:{SINK_PORT}", "--out", str(self.sink_file(i))],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            log.close()

    def close(self) -> None:
        for proc in [*self._proxies.values(), *self._sinks.values()]:
            _stop(proc)
        self._proxies.clear()
        self._sinks.clear()
        for i in range(self.n):  # at once: a namespace's own links go away only later
            subprocess.run(["ip", "link", "del", f"{self._root_if_stem}{i}"],
                           capture_output=True, check=False)  # fmt: skip
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self._made.clear()

    # -- faults ---------------------------------------------------------------------------
    def _ipt(self, i: int, *args: str) -> None:
        _run([*self.exec_prefix(i), "iptables", "-w", *args])

    def link_down(self, i: int) -> None:
        _run(["ip", "-n", self.ns(i), "link", "set", f"r{i}", "down"])

    def link_up(self, i: int) -> None:
        _run(["ip", "-n", self.ns(i), "link", "set", f"r{i}", "up"])

    def drop(self, src: int, dst: int) -> None:
        """Packets from src to dst are dropped (dst's to src still arrive)."""
        self._ipt(src, "-A", "OUTPUT", "-d", self.raft_ip(dst), "-j", "DROP")

    def cut(self, a: int, b: int) -> None:
        self.drop(a, b)
        self.drop(b, a)

    def isolate(self, i: int) -> None:
        for j in range(self.n):
            if j != i:
                self.cut(i, j)

    def loss(self, i: int, probability: float) -> None:
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self._ipt(i, "-A", chain, flag, f"r{i}", "-m", "statistic", "--mode", "random",
                      "--probability", f"{probability:.4f}", "-j", "DROP")  # fmt: skip

    def delay(self, i: int, delay_ms: float, jitter_ms: float, seed: int) -> None:
        """Raft connections node i opens are held delay_ms +- jitter_ms each way."""
        if i not in self._proxies:
            log = open(self.base_dir / f"delayproxy-n{i + 1}.log", "ab")  # noqa: SIM115
            self._proxies[i] = subprocess.Popen(
                [*self.exec_prefix(i), sys.executable, "-m", "tests.support.delayproxy",
                 "--port", str(DELAY_PROXY_PORT), "--delay-ms", str(delay_ms),
                 "--jitter-ms", str(jitter_ms), "--seed", str(seed), "--mark", PROXY_MARK],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
            )  # fmt: skip
            log.close()
            time.sleep(0.5)  # listening before connections are sent its way
        self._ipt(i, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", f"{RAFT_NET}.0/24",
                  "-m", "mark", "!", "--mark", PROXY_MARK,
                  "-j", "REDIRECT", "--to-ports", str(DELAY_PROXY_PORT))  # fmt: skip

    def heal(self) -> None:
        for i in range(self.n):
            self._ipt(i, "-F")
            self._ipt(i, "-t", "nat", "-F")
            self.link_up(i)
        for proc in self._proxies.values():
            _stop(proc)
        self._proxies.clear()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
