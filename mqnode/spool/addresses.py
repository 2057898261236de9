"""Envelope addresses: what RFC 5321 (4.1.2, 4.1.3, 4.5.3.1) and RFC 6531 allow; ASCII forms.

    Mailbox       = Local-part "@" ( Domain / address-literal )
    Local-part    = Dot-string / Quoted-string
    Domain        = sub-domain *("." sub-domain), each a letter-digit-hyphen label
    address-literal = "[" IPv4 "]" / "[IPv6:" IPv6 "]"

With SMTPUTF8 (RFC 6531) atext and qtext also take any non-ASCII UTF-8, and a
domain may be written with U-labels (`bücher.test`), which must be valid IDNA
(checked by converting them to A-labels). Without SMTPUTF8 an address is ASCII.
Limits: local part 64 octets, domain 255, the whole path 256 (RFC 5321
4.5.3.1), counted in UTF-8. General address literals (`[tag:...]`) are
refused: nothing here can route them.

`check(address, utf8)` returns None for a valid mailbox, else the reason,
which the SMTP reply names. `domain_of` / `ascii_domain` give the part mail is
routed by (an address literal stays as written: delivery/mx.py resolves it).
"""

from __future__ import annotations

import ipaddress
import re

import idna  # IDNA 2008 with UTS 46 (the stdlib codec is IDNA 2003)

LOCAL_MAX = 64
DOMAIN_MAX = 255
PATH_MAX = 254  # the 256 of RFC 5321 4.5.3.1.3 less the angle brackets

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*")
# qtextSMTP: 32-33, 35-91, 93-126; quoted-pairSMTP: backslash and 32-126.
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def split(address: str) -> tuple[str, str]:
    """(local part, domain) at the last "@" (a quoted local part may hold "@")."""
    local, _, domain = address.rpartition("@")
    return local, domain


def check(address: str, utf8: bool) -> str | None:
    """None if `address` is a valid mailbox (module docstring), else why not."""
    if not address.isprintable():
        return "control characters"
    try:
        size = len(address.encode("utf-8"))
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
        return "not UTF-8"
    if not utf8 and not address.isascii():
        return "non-ASCII address without SMTPUTF8"
    if size > PATH_MAX:
        return f"longer than {PATH_MAX} octets"
    local, domain = split(address)
    if not local or not domain:
        return "not local-part@domain"
    if len(local.encode("utf-8")) > LOCAL_MAX:
        return f"local part longer than {LOCAL_MAX} octets"
    dot, quoted = (_DOT_STRING_UTF8, _QUOTED_UTF8) if utf8 else (_DOT_STRING, _QUOTED)
    if dot.fullmatch(local) is None and quoted.fullmatch(local) is None:
        return "bad local part"
    if domain.startswith("["):
        return _check_literal(domain)
    return _check_domain(domain)


def _check_literal(domain: str) -> str | None:
    if not domain.endswith("]"):
        return "bad address literal"
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return "bad address literal (IPv4, or IPv6: with the tag)"
    return None


def _check_domain(domain: str) -> str | None:
    try:
        ascii_form = ascii_domain(domain)
    except ValueError as exc:
        return f"bad domain: {exc}"
    if len(ascii_form) > DOMAIN_MAX:
        return f"domain longer than {DOMAIN_MAX} octets"
    labels = ascii_form.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return "bad domain"
    return None


def ascii_domain(domain: str) -> str:
    """The domain with U-labels as A-labels (IDNA 2008, UTS 46 mapping); ValueError if
    invalid. ASCII domains and address literals come back as they are."""
    if domain.isascii():
        return domain
    try:
        return str(idna.encode(domain, uts46=True).decode("ascii"))
    except idna.IDNAError as exc:
        raise ValueError(str(exc) or "invalid IDNA") from exc


def ascii_form(address: str) -> str | None:
    """The address with its domain as A-labels, or None if its local part is not ASCII
    (such an address needs SMTPUTF8 at the next hop)."""
    local, domain = split(address)
    if not local.isascii():
        return None
    try:
        return f"{local}@{ascii_domain(domain)}"
    except ValueError:
        return None
