"""json_body: an admin request's JSON, decoded under the same bound as the API's.

The admin endpoint takes at most 1 MiB (aiohttp's `client_max_size`), which
`json.loads` could still turn into some 350,000 values in one C call that holds
the GIL (api/bounded_json.py says why that matters to Raft's tick thread). The
largest legitimate admin body is a suppression write of 10,000 entries (about
70,000 values with the fields the route reads), so the bound leaves room for
entries carrying twice as many fields besides.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mqnode.api.bounded_json import loads_bounded

MAX_VALUES = 200_000


async def json_body(request: web.Request) -> Any:
    """The request's JSON document; ValueError if it is not JSON or has too many values."""
    return loads_bounded(await request.read(), MAX_VALUES)
