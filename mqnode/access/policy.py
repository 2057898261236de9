"""Which role each HTTP route needs, and the middleware that checks it.

Every route of the admin endpoint and of the injection API is in ROUTE_ROLES;
a route that is not answers 500 (and tests/integration/test_roles.py fails), so
a new endpoint cannot ship unguarded. A value is a role (access/principals.py),
PUBLIC (no credentials), STATUS (public while `public_status` is on, the
default, so monitoring scrapes keep working; else `view`), or for
`POST /queue/{op}` a role per operation.

Answers: 401 without valid credentials (`WWW-Authenticate: Bearer`), saying
whether they were missing or wrong; 403 naming the principal and the role it
lacks. The API answers both as RFC 9457 problem documents.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mqnode.access.principals import Principal, Principals

PUBLIC = "public"
STATUS = "status"
ANYONE_KNOWN = "any"  # a path no route matches: any valid credentials, then 404
PRINCIPAL_KEY = "mqnode.principal"  # where the middleware leaves the principal
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTE_ROLES: dict[tuple[str, str], str | dict[str, str]] = {
    # admin endpoint (admin/endpoint.py)
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/status"): STATUS,
    ("GET", "/metrics"): STATUS,
    ("GET", "/queue"): "view",
    ("GET", "/queue/{id}"): "view",
    ("GET", "/queue/{id}/body"): "admin",
    ("POST", "/queue/{op}"): {
        "hold": "operate",
        "release": "operate",
        "retry": "operate",
        "delete": "admin",
        "bounce": "admin",
    },
    ("POST", "/raft/compact"): "operate",
    ("POST", "/raft/transfer-leadership"): "admin",
    ("POST", "/raft/add-node"): "admin",
    ("POST", "/raft/remove-node"): "admin",
    ("POST", "/dkim/reload"): "admin",
    ("POST", "/principals/reload"): "admin",
    ("POST", "/fault/partition"): "admin",
    ("POST", "/fault/reset"): "admin",
    ("GET", "/suppressions"): "view",
    ("GET", "/suppressions/entry"): "view",
    ("GET", "/suppressions/check"): "view",
    ("POST", "/suppressions/add"): "operate",
    ("POST", "/suppressions/remove"): "operate",
    ("GET", "/shaping"): "operate",
    ("POST", "/shaping"): "admin",
    ("GET", "/audit"): "view",
    # injection API (api/server.py)
    ("GET", "/v1/openapi.json"): PUBLIC,
    ("POST", "/v1/messages"): "submit",
}


def required_role(request: web.Request, public_status: bool) -> str | None:
    """The role `request` needs; PUBLIC for none; None when its route has no entry."""
    route = request.match_info.route
    resource = route.resource
    if resource is None:  # no route matched: 401 before the 404, as for a real route
        return ANYONE_KNOWN
    method = "GET" if request.method == "HEAD" else request.method
    rule = ROUTE_ROLES.get((method, resource.canonical))
    if isinstance(rule, dict):
        # An unknown op needs the highest role: its 400 tells nothing to anyone else.
        return rule.get(request.match_info.get("op", ""), "admin")
    if rule == STATUS:
        return PUBLIC if public_status else "view"
    return rule


def guard(
    principals: Callable[[], Principals],
    public_status: Callable[[], bool],
    refuse: Callable[[web.Request, int, str, dict[str, str]], web.StreamResponse],
) -> Any:
    """An aiohttp middleware checking ROUTE_ROLES. `refuse(request, status, detail,
    headers)` answers a refusal in the app's own format. The principal goes in
    `request[PRINCIPAL_KEY]`."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        role = required_role(request, public_status())
        if role is None:
            return refuse(request, 500, f"route {request.path} has no role assigned", {})
        if role == PUBLIC:
            return await handler(request)
        given = request.headers.get("Authorization", "")
        principal = await principals().authenticate(given)
        if principal is None:
            # Say which: a wrong token (each node has its own) is a different mistake.
            missing = given.strip() in ("", "Bearer")
            why = (
                "admin token required"
                if missing
                else "admin token refused: wrong token (each node has its own admin token) "
                "or unknown principal key"
            )
            return refuse(request, 401, why, {"WWW-Authenticate": "Bearer"})
        if role != ANYONE_KNOWN and not principal.may(role):
            return refuse(
                request, 403, f"forbidden: principal {principal.name!r} lacks the role {role!r}", {}
            )
        request[PRINCIPAL_KEY] = principal
        return await handler(request)

    return middleware


def unassigned(app: web.Application) -> list[str]:
    """The app's routes without an entry in ROUTE_ROLES ("METHOD path"); a server refuses
    to start with any (admin/endpoint.py, api/server.py)."""
    out = []
    for route in app.router.routes():
        resource = route.resource
        if route.method == "HEAD" or resource is None:
            continue
        if (route.method, resource.canonical) not in ROUTE_ROLES:
            out.append(f"{route.method} {resource.canonical}")
    return out


def principal_of(request: web.Request) -> str:
    """The name of the principal that made `request` ("" for a public route)."""
    found = request.get(PRINCIPAL_KEY)
    return found.name if isinstance(found, Principal) else ""
