"""The package layout's rules (docs: README "Module map"): imports point one way, and each
third-party library that needs an adapter is imported in one place.

Layers, bottom up: the frame's leaves (errors, clock, storage, tls, events, logsetup,
eventloop, allocator, compression, config, passwords) -> spool/, access/ -> raft/,
signing/ -> intake -> smtp/, delivery/, dsn/ -> api/ -> admin/ -> node, cli, restore.
devtools/ is never imported by the node's code.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mqnode"

# What each part may import from mqnode (besides itself).
LEAVES = {
    "errors",
    "clock",
    "storage",
    "tls",
    "events",
    "config",
    "eventloop",
    "allocator",
    "logsetup",
    "compression",
    "passwords",
}
ALLOWED: dict[str, set[str]] = {
    "spool": LEAVES,
    "signing": LEAVES | {"spool"},
    "raft": LEAVES | {"spool"},
    "dsn": LEAVES | {"spool", "signing"},
    "intake": LEAVES | {"spool", "raft", "signing"},
    "smtp": LEAVES | {"spool", "raft", "signing", "intake", "access"},
    "access": LEAVES,
    "api": LEAVES | {"spool", "raft", "signing", "intake", "access", "smtp"},
    "delivery": LEAVES | {"spool", "raft", "dsn", "signing"},
    "admin": LEAVES | {"spool", "raft", "dsn", "delivery", "smtp", "signing", "access", "api"},
    "devtools": LEAVES | {"spool", "raft", "dsn", "delivery", "smtp", "admin", "signing"},
}
# Libraries reached through one adapter module (or package).
ADAPTERS: dict[str, str | tuple[str, ...]] = {
    "pysyncobj": "raft/",
    "lmdb": "storage.py",
    "aiosmtplib": ("delivery/client.py", "delivery/pipelining.py"),  # its transport, lent
    "dns": "delivery/mx.py",
    "prometheus_client": "admin/metrics.py",
    "cryptography": ("raft/wire.py", "signing/keys.py"),
    "dkim": "signing/dkim_signer.py",
    "uvloop": "eventloop.py",
    "idna": "spool/addresses.py",
    "jsonschema": "api/server.py",
    "referencing": "api/server.py",
}


def _modules() -> list[tuple[str, Path]]:
    return [(str(p.relative_to(PACKAGE)), p) for p in sorted(PACKAGE.rglob("*.py"))]


def _imports(path: Path) -> list[str]:
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import; mqnode uses absolute ones"
            base = node.module
            out += [f"{base}.{a.name}" if base == "mqnode" else base for a in node.names]
    return out


def _part(module: str) -> str:
    """mqnode.raft.node -> raft; mqnode.errors -> errors."""
    return module.split(".")[1]


@pytest.mark.parametrize("rel,path", _modules(), ids=lambda v: str(v))
def test_imports_point_one_way(rel: str, path: Path) -> None:
    here = rel.split("/")[0].removesuffix(".py")
    allowed = ALLOWED.get(here)
    for imported in _imports(path):
        if not imported.startswith("mqnode."):
            continue
        there = _part(imported)
        if there == here:
            continue
        if there == "devtools":
            assert here in {"devtools", "cli"}, f"{rel} imports {imported}: devtools is apart"
        if allowed is not None:
            assert there in allowed, f"{rel} imports {imported} ({here}/ may not use {there})"


@pytest.mark.parametrize("library,homes", sorted(ADAPTERS.items()))
def test_each_library_has_one_adapter(library: str, homes: str | tuple[str, ...]) -> None:
    users = [
        rel
        for rel, path in _modules()
        if any(m == library or m.startswith(library + ".") for m in _imports(path))
    ]
    assert users, f"nothing imports {library}"
    allowed = (homes,) if isinstance(homes, str) else homes

    def at_home(u: str) -> bool:
        return any(u == h or (h.endswith("/") and u.startswith(h)) for h in allowed)

    strays = [u for u in users if not at_home(u)]
    assert not strays, f"{library} is imported outside {allowed}: {strays}"


def test_only_internals_names_pysyncobj_privates() -> None:
    """Name-mangled pysyncobj attributes appear in raft/internals.py only."""
    strays = [
        rel
        for rel, path in _modules()
        if rel != "raft/internals.py"
        and any(f"_{cls}__" in path.read_text() for cls in ("SyncObj", "TcpConnection"))
    ]
    assert not strays, strays


def test_no_module_or_package_is_named_like_a_stdlib_module() -> None:
    """A `queue/` or `http.py` shadows the stdlib's whenever its directory lands on sys.path
    (a script run from inside the package, or a child process given the wrong PYTHONPATH):
    `import queue` in concurrent.futures then finds ours."""
    clashes = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*")
        if (p.suffix == ".py" and p.stem in sys.stdlib_module_names)
        or (p.is_dir() and p.name in sys.stdlib_module_names)
    ]
    assert not clashes, clashes


def test_raft_reaches_the_spool_only_through_its_contracts() -> None:
    """raft/ takes the state machine and store as Protocols (raft/contracts.py); only the
    commit pipeline and the format gate, which encode the spool's commands, import it."""
    speaking = {"raft/commit_pipeline.py", "raft/formats.py"}
    strays = [
        rel
        for rel, path in _modules()
        if rel.startswith("raft/")
        and rel not in speaking
        and any(m.startswith("mqnode.spool") for m in _imports(path))
    ]
    assert not strays, strays
