"""From a validated API request to the messages it asks for: envelope and RFC 5322 bytes.

Three forms (the OpenAPI document, api/openapi.json, has the fields):

* `raw` / `raw_base64` with an `envelope` (`from`, `to`): the message as given,
  line ends made CRLF; a line over 998 bytes (RFC 5322 2.1.1), or
  `hopcount_limit` Received fields (a mail loop), is refused, as SMTP's DATA
  refuses it;
* structured fields (`from`, `to`/`cc`/`bcc`, `reply_to`, `subject`, `text`,
  `html`, `headers`, `attachments`) built into MIME by Python's `email` package
  with a Date and a Message-ID; the envelope defaults to From and every
  To/Cc/Bcc address (Bcc never appears in the headers);
* a batch: structured fields as a template and `recipients`, each with its own
  `vars`; each recipient gets its own message, To: that recipient, with every
  `{{name}}` in the subject, text, html and header values replaced by its value
  (a name without a value is refused, not left in).

Everything wrong is a Problem naming the field (a JSON Pointer): 422 for content,
413 for a message over `max_message_bytes`. Pure: the time and the Message-ID's
randomness come in as arguments.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.policy
import email.utils
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

from mqnode.api.problems import Problem
from mqnode.smtp.data import has_long_line
from mqnode.smtp.handler import header_count
from mqnode.spool import addresses
from mqnode.spool.header_section import HOPCOUNT_LIMIT, received_count

# Set by their own fields; `headers` may not set them.
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    }
)
_VAR = re.compile(r"\{\{\s*([A-Za-z0-9_.-]{1,64})\s*\}\}")
_MIME_TYPE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
)
_EOL = re.compile(rb"\r?\n|\r")
MAX_LINE_BYTES = 998  # without its CRLF
STRUCTURED = ("from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "headers")


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int
    max_recipients: int
    max_header_count: int
    max_batch: int
    hostname: str
    hopcount_limit: int = HOPCOUNT_LIMIT  # Received fields that make a raw message a loop


@dataclass(frozen=True)
class Draft:
    """One message to queue."""

    mail_from: str
    rcpts: tuple[str, ...]
    body: bytes


def compose(
    doc: dict[str, Any], limits: Limits, now_ms: int, token: Callable[[], str]
) -> list[Draft]:
    """The messages `doc` asks for (see the module docstring); Problem if it cannot be.
    `token()`: a fresh random string for each Message-ID."""
    raw = "raw" in doc or "raw_base64" in doc
    if raw:
        for name in (*STRUCTURED, "attachments", "recipients"):
            if name in doc:
                raise Problem(
                    422,
                    f"{name} goes with structured messages, not raw",
                    [(f"/{name}", "not with raw")],
                )
        if "raw" in doc and "raw_base64" in doc:
            raise Problem(422, "raw or raw_base64, not both", [("/raw_base64", "not with raw")])
        return [_raw(doc, limits)]
    if "from" not in doc:
        raise Problem(422, "from is required (or raw with an envelope)", [("/from", "required")])
    if not any(k in doc for k in ("text", "html", "attachments")):
        raise Problem(422, "a message needs text, html or attachments", [("/text", "required")])
    if "recipients" not in doc:
        return [_build(doc, {}, limits, now_ms, token(), "")]
    for name in ("to", "cc", "bcc"):
        if name in doc:
            raise Problem(
                422,
                f"a batch sends to its recipients; {name} is not allowed",
                [(f"/{name}", "not in a batch")],
            )
    batch = doc["recipients"]
    if len(batch) > limits.max_batch:
        raise Problem(
            422,
            f"more than {limits.max_batch} recipients in one batch",
            [("/recipients", "too many")],
        )
    out = []
    for i, item in enumerate(batch):
        one = {**doc, "to": [item["to"]]}
        out.append(_build(one, item.get("vars", {}), limits, now_ms, token(), f"/recipients/{i}"))
    return out


def _raw(doc: dict[str, Any], limits: Limits) -> Draft:
    env = doc.get("envelope") or {}
    if "from" not in env or "to" not in env:
        raise Problem(
            422,
            "a raw message needs envelope.from and envelope.to",
            [("/envelope", "from and to required")],
        )
    sender = env["from"]
    if sender and (why := addresses.check(sender, True)):
        raise Problem(422, f"envelope.from: {why}", [("/envelope/from", why)])
    rcpts = _envelope_rcpts([(f"/envelope/to/{i}", a) for i, a in enumerate(env["to"])], limits)
    if "raw" in doc:
        body = doc["raw"].encode("utf-8", "surrogateescape")
    else:
        try:
            body = base64.b64decode(doc["raw_base64"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Problem(
                422, f"raw_base64: not base64 ({exc})", [("/raw_base64", "not base64")]
            ) from exc
    body = _EOL.sub(b"\r\n", body)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    at = "/raw" if "raw" in doc else "/raw_base64"
    if has_long_line(body, MAX_LINE_BYTES):  # as SMTP's DATA refuses it (500 5.5.2)
        raise Problem(
            422,
            f"a line longer than {MAX_LINE_BYTES} bytes (RFC 5322 2.1.1)",
            [(at, "line too long")],
        )
    draft = _checked(Draft(sender, rcpts, body), limits, at)  # the header count first
    if received_count(body) >= limits.hopcount_limit:  # as SMTP refuses it (554 5.4.6)
        raise Problem(422, "too many Received fields: a mail loop", [(at, "too many hops")])
    return draft


def _build(
    doc: dict[str, Any], values: dict[str, Any], limits: Limits, now_ms: int, token: str, where: str
) -> Draft:
    """One structured message; `values` for `{{name}}` (a batch recipient's vars)."""
    fill = _filler(values, where + "/vars" if where else "")
    sender_name, sender = _address(doc["from"], "/from")
    heads: list[tuple[str, str]] = [("From", _formatted(sender_name, sender, "/from"))]
    envelope_to: list[tuple[str, str]] = []
    for field_name, header in (("to", "To"), ("cc", "Cc"), ("bcc", "")):
        shown = []
        for i, item in enumerate(doc.get(field_name, [])):
            at = f"{where}/to" if where else f"/{field_name}/{i}"
            name, addr = _address(item, at)
            envelope_to.append((at, addr))
            shown.append(_formatted(name, addr, at))
        if shown and header:
            heads.append((header, ", ".join(shown)))
    if not envelope_to:
        raise Problem(422, "no recipients: give to, cc or bcc", [("/to", "required")])
    if "reply_to" in doc:
        name, addr = _address(doc["reply_to"], "/reply_to")
        heads.append(("Reply-To", _formatted(name, addr, "/reply_to")))
    if "subject" in doc:
        heads.append(("Subject", _header_value(fill(doc["subject"], "subject"), "/subject")))
    when = datetime.datetime.fromtimestamp(now_ms / 1000, tz=datetime.UTC)
    heads.append(("Date", email.utils.format_datetime(when)))
    own = {k.lower(): v for k, v in doc.get("headers", {}).items()}
    for name, value in doc.get("headers", {}).items():
        if name.lower() in RESERVED_HEADERS:
            raise Problem(
                422, f"headers: {name} is set by its own field", [(f"/headers/{name}", "reserved")]
            )
        heads.append((name, _header_value(fill(value, f"headers/{name}"), f"/headers/{name}")))
    if "message-id" not in own:
        heads.append(("Message-ID", f"<{token}@{limits.hostname}>"))
    utf8 = not all(a.isascii() for _, a in [("", sender), *envelope_to])
    msg = EmailMessage(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)
    try:
        for name, value in heads:
            msg[name] = value
        _content(msg, doc, fill)
        body = msg.as_bytes()
    except Problem:
        raise
    except (ValueError, TypeError, IndexError, LookupError) as exc:
        raise Problem(422, f"cannot build the message: {exc}", [(where or "/", str(exc))]) from exc
    rcpts = _envelope_rcpts(envelope_to, limits)
    return _checked(Draft(sender, rcpts, body), limits, where or "/")


def _content(msg: EmailMessage, doc: dict[str, Any], fill: Callable[[str, str], str]) -> None:
    text = fill(doc["text"], "text") if "text" in doc else None
    html = fill(doc["html"], "html") if "html" in doc else None
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    elif html is not None:
        msg.set_content(html, subtype="html")
    for i, att in enumerate(doc.get("attachments", [])):
        at = f"/attachments/{i}"
        ctype = att.get("content_type", "application/octet-stream")
        if not _MIME_TYPE.match(ctype):
            raise Problem(
                422, f"attachments {i}: bad content_type", [(f"{at}/content_type", "type/subtype")]
            )
        try:
            data = base64.b64decode(att["content"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Problem(
                422, f"attachments {i}: content is not base64", [(f"{at}/content", "not base64")]
            ) from exc
        filename = _header_value(att["filename"], f"{at}/filename")
        main, sub = ctype.split("/", 1)
        msg.add_attachment(data, maintype=main, subtype=sub, filename=filename)


def _filler(values: dict[str, Any], where: str) -> Callable[[str, str], str]:
    def fill(text: str, field_name: str) -> str:
        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in values:
                at = where or "/"
                raise Problem(
                    422, f"no value for {{{{{name}}}}} (in {field_name})", [(at, f"{name} missing")]
                )
            value = values[name]
            return ("true" if value else "false") if isinstance(value, bool) else str(value)

        return _VAR.sub(one, text) if "{{" in text else text

    return fill


def _address(item: Any, at: str) -> tuple[str, str]:
    """(display name, addr-spec) of an Address field, checked."""
    if isinstance(item, dict):
        name, addr = str(item.get("name", "")), str(item["email"])
    else:
        found = email.utils.getaddresses([item])
        if len(found) != 1 or not found[0][1]:
            raise Problem(422, f"{at}: not one address", [(at, "not one address")])
        name, addr = found[0]
    if why := addresses.check(addr, True):
        raise Problem(422, f"{at}: {why}", [(at, why)])
    if any(c in name for c in "\r\n"):
        raise Problem(422, f"{at}: line break in the name", [(at, "line break")])
    return name, addr


def _formatted(name: str, addr: str, at: str) -> str:
    try:
        return str(Address(display_name=name, addr_spec=addr))
    except (ValueError, IndexError, TypeError) as exc:
        raise Problem(422, f"{at}: {exc}", [(at, str(exc))]) from exc


def _header_value(value: str, at: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise Problem(422, f"{at}: line break or NUL in a header value", [(at, "line break")])
    return value


def _envelope_rcpts(items: list[tuple[str, str]], limits: Limits) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for at, addr in items:
        if why := addresses.check(addr, True):
            raise Problem(422, f"{at}: {why}", [(at, why)])
        seen.setdefault(addr, None)
    if len(seen) > limits.max_recipients:
        raise Problem(422, f"more than {limits.max_recipients} recipients", [("/to", "too many")])
    return tuple(seen)


def _checked(draft: Draft, limits: Limits, at: str) -> Draft:
    if len(draft.body) > limits.max_message_bytes:
        raise Problem(
            413, f"message larger than {limits.max_message_bytes} bytes", [(at, "too large")]
        )
    if header_count(draft.body, limits.max_header_count) > limits.max_header_count:
        raise Problem(
            422, f"more than {limits.max_header_count} header fields", [(at, "too many headers")]
        )
    return draft
