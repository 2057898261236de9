"""Clients for the HTTP injection API and principals files, for tests and the bench."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mqnode.access.principals import new_principal


def post_json(
    url: str,
    doc: Any,
    token: str = "",
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
    raw: bytes | None = None,
    content_type: str = "application/json",
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON answer or {"text": ...}, headers); never raises on an HTTP status."""
    data = raw if raw is not None else json.dumps(doc).encode()
    req = urllib.request.Request(url, data=data, method="POST")
    req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as resp:
            return resp.status, _doc(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, _doc(exc.read()), dict(exc.headers)


def request(
    url: str, method: str = "GET", token: str = "", body: bytes | None = None
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _doc(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        return {"text": data.decode(errors="replace")}
    return doc if isinstance(doc, dict) else {"value": doc}


def write_principals(
    path: Path, roles: dict[str, list[str]], rates: dict[str, int] | None = None
) -> dict[str, str]:
    """A principals file (mode 600) with one principal per entry (`rates`: their
    api_rate_per_min, where not the default); their tokens by name."""
    tokens, entries = {}, []
    for name, granted in roles.items():
        token, entry = new_principal(name, granted)
        if rates and name in rates:
            entry += f"api_rate_per_min = {rates[name]}\n"
        tokens[name] = token
        entries.append(entry)
    path.write_text("\n".join(entries), encoding="utf-8")
    os.chmod(path, 0o600)
    return tokens
