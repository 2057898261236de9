"""RFC 9457 problem documents: every refusal of the injection API, naming the field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aiohttp import web

TYPE_BASE = "https://mqnode.dev/problems/"  # `type` URIs: stable names, not fetched
TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
}
MAX_DETAIL_CHARS = 300


@dataclass
class Problem(Exception):
    """A refusal: HTTP status, what is wrong, and the fields at fault (JSON Pointers)."""

    status: int
    detail: str
    errors: list[tuple[str, str]] = field(default_factory=list)  # (pointer, detail)
    kind: str = ""  # the `type` URI's last part; default: from the status
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)  # extension members (RFC 9457 3.2)

    def __str__(self) -> str:
        return f"{self.status} {self.detail}"

    def response(self) -> web.Response:
        doc: dict[str, object] = {
            "type": TYPE_BASE + (self.kind or str(self.status)),
            "title": TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": _short(self.detail),
        }
        if self.errors:
            doc["errors"] = [{"pointer": p, "detail": _short(d)} for p, d in self.errors[:20]]
        doc.update(self.extra)
        return web.Response(
            status=self.status,
            body=json.dumps(doc).encode(),
            content_type="application/problem+json",
            headers=self.headers,
        )


def refusal(
    request: web.Request, status: int, detail: str, headers: dict[str, str]
) -> web.StreamResponse:
    """The role check's refusals (access/policy.py) as problem documents."""
    return Problem(status, detail, headers=headers).response()


def pointer(path: object) -> str:
    """A JSON Pointer (RFC 6901) from a path of keys and indexes."""
    parts = path if isinstance(path, (list, tuple)) else []
    out = "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)
    return out or "/"


def _short(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."
