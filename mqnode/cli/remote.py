"""The command line's side of the admin endpoint: one HTTP request, its errors as one line.

A 401 says whether the token was missing or wrong (each node has its own); an
unreachable node, a refusal or the node's own error sentence becomes an
`MqnodeError` (exit 1), a bad token or flag a `ConfigError` (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any

from mqnode.errors import ConfigError, MqnodeError


def token(args: argparse.Namespace) -> str:
    path = getattr(args, "admin_token_file", None)
    if path:
        try:
            return open(path, encoding="utf-8").read().strip()
        except OSError as exc:
            raise ConfigError(f"--admin-token-file: cannot read {path}: {exc.strerror}") from exc
    return os.environ.get("MQNODE_ADMIN_TOKEN", "")


def request(
    admin: str,
    path: str,
    token: str,
    body: dict[str, Any] | None = None,
    timeout_s: float = 60,
    raw: bool = False,
) -> Any:
    """The node's JSON answer (`raw`: the bytes as they came); errors as one line."""
    req = urllib.request.Request(
        f"http://{admin}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            data = resp.read()
            return data if raw else json.loads(data)
    except urllib.error.HTTPError as exc:
        if exc.code == 401 and not token:
            raise ConfigError(
                "admin token required: pass --admin-token-file DATA_DIR/admin.token "
                "or set MQNODE_ADMIN_TOKEN"
            ) from exc
        if exc.code == 401:
            raise ConfigError(
                f"admin token refused by {admin}: wrong token; each node has its own "
                "(its DATA_DIR/admin.token, or the file its admin_token_file names)"
            ) from exc
        text = exc.read().decode(errors="replace")
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            text = doc["error"]  # the node's own sentence, not its JSON
        raise MqnodeError(f"{path}: {exc.code} {text}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise MqnodeError(f"cannot reach admin endpoint {admin}: {exc}") from exc


def fetch(admin: str, path: str, token: str = "") -> Any:
    return request(admin, path, token, timeout_s=10)
