"""The HTTP injection API: `POST /v1/messages`, and its OpenAPI document.

Served on the admin endpoint (`admin_addr`) always, and on a listener of its
own with `api_addr` (HTTPS with `api_tls_cert`/`api_tls_key`), whose only
routes are these. Every request needs a principal with the role `submit`
(access/policy.py); the request is checked against the OpenAPI schema
(api/openapi.json, with jsonschema), built into messages (api/compose.py) and
each message goes through the same intake as SMTP's (intake.py): Message-ID,
DKIM, commit. The answer, `200 {"messages": [{"queue_id", "message_id",
"recipients", "duplicate"}], "refused": [...]}`, comes only once every
message is committed by a majority.

`Idempotency-Key`: message i of a request is keyed by (principal, key, i); a
retried request within 24 hours gets the first one's queue ids (`duplicate`
true) and queues nothing, also on another node and after a failover. Without
the header each request is new. A batch that fails part-way (503) lists what
was queued; retrying it with the same key queues only the rest.

Refusals are RFC 9457 problem documents (api/problems.py): 400 malformed JSON,
415 not JSON, 413 too large, 422 a field (named by a JSON Pointer), 429 over
the principal's `api_rate_per_min` (a token bucket counting messages), 503
with Retry-After when the cluster cannot commit now (no leader, back-pressure)
or storage is nearly full. Suppressed recipients (suppression_action refuse)
are left out and listed in `refused`; a message left without recipients is
not queued (422 when that is the whole request).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import logging
import ssl
from collections.abc import Callable
from importlib import resources
from typing import Any

from aiohttp import web
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from mqnode.access.policy import PRINCIPAL_KEY, guard, principal_of, unassigned
from mqnode.access.principals import Principal, Principals
from mqnode.api.bounded_json import TooManyValues, loads_bounded
from mqnode.api.compose import Draft, Limits, compose
from mqnode.api.problems import Problem, pointer, refusal
from mqnode.clock import Clock
from mqnode.errors import BackpressureError, ConfigError, SubmitError
from mqnode.intake import Accepted, Intake, Submission
from mqnode.smtp.ratelimit import RateLimiter
from mqnode.spool.header_section import rfc5322_date

log = logging.getLogger(__name__)

SCHEMA_URI = "urn:mqnode:openapi"
MAX_IDEMPOTENCY_KEY = 255
RETRY_AFTER_S = "2"
MAX_SCHEMA_ERRORS = 20


def api_request_bytes(max_message_bytes: int) -> int:
    """A request may carry one message at its largest, base64, and some JSON around it."""
    return max_message_bytes * 4 // 3 + 1024 * 1024


def openapi_document() -> dict[str, Any]:
    text = resources.files("mqnode.api").joinpath("openapi.json").read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


class InjectionApi:
    def __init__(
        self,
        intake: Intake,
        limits: Limits,
        clock: Clock,
        random_bytes: Callable[[int], bytes],
        fill_ratio: Callable[[], float],
        full_ratio: float = 0.9,
        max_inflight: int = 500,
        wait_s: float = 10.0,
    ) -> None:
        self._intake = intake
        self._limits = limits
        self._clock = clock
        self._random = random_bytes
        self._fill_ratio = fill_ratio
        self._full_ratio = full_ratio
        # Messages of API requests in the commit pipeline at once: a batch of 100 is 100
        # commands, and twenty of them filled `max_pending_commits` (503 for most of a
        # batch). Past this they wait their turn, up to `wait_s`, and only then 503.
        self._slots = asyncio.Semaphore(max_inflight)
        self._wait_s = wait_s
        self._doc = openapi_document()
        registry: Registry[Any] = Registry().with_resource(
            SCHEMA_URI, Resource.from_contents(self._doc, default_specification=DRAFT202012)
        )
        self._validator = Draft202012Validator(
            {"$ref": f"{SCHEMA_URI}#/components/schemas/MessageRequest"}, registry=registry
        )
        self._rates: dict[str, RateLimiter] = {}
        # (recipient, sender's domain) -> why it is suppressed; None: no check (drop mode)
        self.suppressed: Callable[[str, str], str | None] | None = None
        self.accepted = 0  # messages queued
        self.refused = 0  # requests refused
        self._runner: web.AppRunner | None = None

    @property
    def max_request_bytes(self) -> int:
        return api_request_bytes(self._limits.max_message_bytes)

    @property
    def max_json_values(self) -> int:
        """The most values a request's JSON may hold (api/bounded_json.py): a batch's
        recipients with 100 vars each, three address lists of 1,000, every header field,
        and room for the rest; the schema then checks each list's own limit."""
        lim = self._limits
        return 110 * lim.max_batch + 9 * 1000 + lim.max_header_count + 2000

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/messages", self._submit),
            web.get("/v1/openapi.json", self._openapi),
        ]

    async def start(
        self,
        host: str,
        port: int,
        principals: Callable[[], Principals],
        tls: ssl.SSLContext | None,
    ) -> None:
        """The API's own listener (api_addr): these routes only."""
        app = web.Application(
            middlewares=[guard(principals, lambda: False, refusal)],
            client_max_size=self.max_request_bytes,
        )
        app.add_routes(self.routes())
        if missing := unassigned(app):
            raise ConfigError(f"api: routes without a role: {', '.join(missing)}")
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=tls).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self._doc)

    async def _submit(self, request: web.Request) -> web.Response:
        try:
            return await self._answer(request)
        except Problem as problem:
            self.refused += 1
            return problem.response()

    async def _answer(self, request: web.Request) -> web.Response:
        doc = await self._read(request)
        key = _idempotency_key(request)
        drafts = self.drafts(doc, self._clock.wall_ms())
        principal = request.get(PRINCIPAL_KEY)
        name = principal_of(request)
        self._take(principal, name, len(drafts))
        if self._fill_ratio() >= self._full_ratio:
            raise Problem(503, "storage nearly full; try later", headers=_retry())
        # Keyed by each message's place in the request, before suppression leaves some out:
        # a retry after the list changed still maps each message to its first id.
        kept, refused = self._unsuppressed(drafts)
        if not kept:
            raise Problem(
                422,
                "every recipient is suppressed",
                [("/", f"{r['recipient']}: {r['detail']}") for r in refused],
            )
        secure = request.secure
        client = f"{request.remote or '?'} (api: {name})"
        subs = [
            Submission(
                mail_from=d.mail_from,
                rcpts=d.rcpts,
                body=d.body,
                idem=self._idem(name, key, i),
                client=client,
                trace=self._trace(request.remote or "?", d.rcpts, secure),
            )
            for i, d in kept
        ]
        results = await asyncio.gather(*(self._accept(s) for s in subs), return_exceptions=True)
        queued = []
        failed: BaseException | None = None
        for sub, result in zip(subs, results, strict=True):
            if isinstance(result, BaseException):
                failed = failed or result
                continue
            queued.append(
                {
                    "queue_id": result.queue_id,
                    "message_id": result.message_id,
                    "recipients": list(sub.rcpts),
                    "duplicate": result.status == "duplicate",
                }
            )
        self.accepted += sum(1 for q in queued if not q["duplicate"])
        if failed is not None:
            if not isinstance(failed, SubmitError):
                log.error("api submission failed", exc_info=failed)
            detail = (
                f"{len(queued)} of {len(subs)} messages queued ({failed}); retry with the "
                "same Idempotency-Key to queue the rest once"
            )
            self.refused += 1
            return Problem(503, detail, headers=_retry(), extra={"queued": queued}).response()
        return web.json_response({"messages": queued, "refused": refused})

    def drafts(self, doc: Any, now_ms: int) -> list[Draft]:
        """The messages a decoded request asks for; Problem naming the field if none."""
        errors = list(itertools.islice(self._validator.iter_errors(doc), MAX_SCHEMA_ERRORS))
        if errors:
            found = [(pointer(list(e.absolute_path)), e.message) for e in errors]
            raise Problem(422, f"{found[0][0]}: {found[0][1]}", found)
        return compose(doc, self._limits, now_ms, self._token)

    async def _accept(self, sub: Submission) -> Accepted:
        try:
            await asyncio.wait_for(self._slots.acquire(), self._wait_s)
        except TimeoutError as exc:
            raise BackpressureError("too many API submissions waiting; try later") from exc
        try:
            return await self._intake.accept(sub)
        finally:
            self._slots.release()

    async def _read(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            raise Problem(415, "send application/json")
        raw = await self._body(request)
        try:
            return loads_bounded(raw, self.max_json_values)
        except TooManyValues as exc:
            raise Problem(413, str(exc)) from exc
        except (ValueError, RecursionError) as exc:
            raise Problem(400, f"malformed JSON: {str(exc)[:200]}") from exc

    async def _body(self, request: web.Request) -> bytes:
        """The request's bytes, at most `max_request_bytes`, read here rather than by
        aiohttp's `read`, whose limit is the application's: the admin endpoint's (1 MiB,
        for its own routes) where the API is served there too."""
        limit = self.max_request_bytes
        too_large = Problem(413, f"request larger than {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        chunks: list[bytes] = []
        held = 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            chunks.append(chunk)
            held += len(chunk)
            if held > limit:
                raise too_large
        return b"".join(chunks)  # one copy of the body, not two

    def _take(self, principal: Any, name: str, n: int) -> None:
        per_min = principal.api_rate_per_min if isinstance(principal, Principal) else 6000
        if per_min == 0:  # unlimited (the admin token)
            return
        limiter = self._rates.get(name)
        if limiter is None or limiter.per_min != per_min:  # new, or changed by a reload
            limiter = self._rates[name] = RateLimiter(per_min, self._clock, max_keys=1)
        if n > per_min or not limiter.allow(name, n):
            raise Problem(
                429,
                f"principal {name!r} is over its api_rate_per_min ({per_min} messages a minute)",
                headers=_retry(),
            )

    def _unsuppressed(
        self, drafts: list[Draft]
    ) -> tuple[list[tuple[int, Draft]], list[dict[str, str]]]:
        """(place in the request, draft) of those with a recipient left, and who was not."""
        check = self.suppressed
        if check is None:
            return list(enumerate(drafts)), []
        kept, refused = [], []
        for i, d in enumerate(drafts):
            domain = d.mail_from.rpartition("@")[2]
            ok = []
            for rcpt in d.rcpts:
                why = check(rcpt, domain)
                if why is None:
                    ok.append(rcpt)
                else:
                    refused.append({"recipient": rcpt, "detail": f"recipient suppressed ({why})"})
            if ok:
                kept.append((i, Draft(d.mail_from, tuple(ok), d.body)))
        return kept, refused

    def _token(self) -> str:
        return base64.b32encode(self._random(15)).decode("ascii").lower()

    def _idem(self, principal: str, key: str | None, index: int) -> bytes:
        if key is None:  # no key: every request is new
            return self._random(32)
        return hashlib.sha256(f"api\0{principal}\0{key}\0{index}".encode()).digest()

    def _trace(
        self, remote: str, rcpts: tuple[str, ...], secure: bool
    ) -> Callable[[str, int], bytes]:
        hostname = self._limits.hostname
        proto = "HTTPS" if secure else "HTTP"

        def trace(queue_id: str, now_ms: int) -> bytes:
            rcpt = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
            return (
                f"Received: from [{remote}]\r\n\tby {hostname} (mqnode) with {proto} "
                f"id {queue_id}{rcpt};\r\n\t{rfc5322_date(now_ms // 1000)}\r\n"
            ).encode("utf-8", "replace")

        return trace


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise Problem(
            400,
            f"Idempotency-Key: 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters",
            kind="idempotency-key",
        )
    return key


def _retry() -> dict[str, str]:
    return {"Retry-After": RETRY_AFTER_S}
