"""dsnparams: RFC 3461 DSN parameters, from the client's MAIL/RCPT to the next hop.

A client asks what it wants to be told, per message and per recipient:

    MAIL FROM:<s> RET=FULL|HDRS ENVID=xtext
    RCPT TO:<r> NOTIFY=NEVER|SUCCESS,FAILURE,DELAY ORCPT=addr-type;xtext

`DsnRequest` holds them for one message (ENVID and ORCPT decoded from xtext;
NOTIFY and ORCPT by recipient index, "" where a recipient gave none). The
queue keeps it with the message; the delivery agent passes it on to a host
that offers DSN, and the dispatcher decides from it whom the sender hears of:

* failure (bounce, expiry): unless NOTIFY was given without FAILURE (NEVER
  included). Without NOTIFY the sender is told, as before RFC 3461;
* success: only with NOTIFY=SUCCESS, and only when the host that took the
  recipient did not offer DSN (`Action: relayed`); a host that offers it was
  given the request and answers for it from there on (Postfix does the same);
* delay: never (Postfix's default `delay_warning_time = 0`).

RET=HDRS returns only the original's header block with a failure report;
RET=FULL (or none) the whole original up to the report's size bound. A
success report carries the header block only (RFC 3461 4.3: RET is for
failures).

Limits (RFC 3461 4.4 and 4.2): ENVID at most 100 characters of xtext, ORCPT
at most 500; a parameter given twice, a bad keyword value or bad xtext is
`501 5.5.4`. Parsing here is pure; smtp/protocol.py pulls the four keywords out
of the parameter string before aiosmtpd, which upper-cases what it sees and
refuses keywords it does not know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DSN_KEYWORDS = frozenset({"RET", "ENVID", "NOTIFY", "ORCPT"})
MAX_ENVID_CHARS = 100
MAX_ORCPT_CHARS = 500
NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_ADDR_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")


class DsnParamError(ValueError):
    """A DSN parameter is malformed; str() is the SMTP reply."""


@dataclass(frozen=True)
class DsnRequest:
    """What the client asked to be told about one message (empty fields: not asked)."""

    ret: str = ""  # "FULL", "HDRS" or ""
    envid: str = ""  # decoded from xtext
    notify: tuple[str, ...] = ()  # per recipient: "", "NEVER" or e.g. "SUCCESS,FAILURE"
    orcpt: tuple[str, ...] = ()  # per recipient: "" or "addr-type;decoded address"

    def __bool__(self) -> bool:
        return bool(self.ret or self.envid or any(self.notify) or any(self.orcpt))

    def _notify(self, index: int) -> str:
        return self.notify[index] if index < len(self.notify) else ""

    def wants_failure(self, index: int) -> bool:
        words = self._notify(index)
        return not words or "FAILURE" in words.split(",")

    def wants_success(self, index: int) -> bool:
        return "SUCCESS" in self._notify(index).split(",")

    def orcpt_of(self, index: int) -> str:
        return self.orcpt[index] if index < len(self.orcpt) else ""

    def original_address(self, index: int) -> str:
        """The ORCPT address for a report's Original-Recipient ("" for other address types)."""
        kind, _, address = self.orcpt_of(index).partition(";")
        return address if kind.lower() in ("rfc822", "utf-8") else ""

    def to_record(self) -> dict[str, Any]:
        return {"ret": self.ret, "envid": self.envid, "notify": self.notify, "orcpt": self.orcpt}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> DsnRequest:
        return cls(rec["ret"], rec["envid"], tuple(rec["notify"]), tuple(rec["orcpt"]))

    # -- what goes to the next hop ----------------------------------------------------
    def mail_options(self) -> list[str]:
        options = [f"RET={self.ret}"] if self.ret else []
        return options + ([f"ENVID={xtext_encode(self.envid)}"] if self.envid else [])

    def rcpt_options(self, index: int) -> list[str]:
        options = [f"NOTIFY={self._notify(index)}"] if self._notify(index) else []
        kind, _, address = self.orcpt_of(index).partition(";")
        return options + ([f"ORCPT={kind};{xtext_encode(address)}"] if kind else [])


def xtext_encode(text: str) -> str:
    """RFC 3461 4: printable ASCII but '+' and '=' as is, every other octet as +HH."""
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in text.encode("utf-8")
    )


def xtext_decode(text: str) -> str:
    if _XTEXT_RE.fullmatch(text) is None:
        raise DsnParamError("501 5.5.4 Error: malformed xtext in a DSN parameter")
    raw = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise DsnParamError("501 5.5.4 Error: a DSN parameter is not UTF-8") from None


def split_params(params: str) -> tuple[str, dict[str, str]]:
    """(the parameters aiosmtpd may see, the DSN ones by upper-case keyword, values as sent)."""
    rest: list[str] = []
    dsn: dict[str, str] = {}
    for param in params.split():
        keyword, _, value = param.partition("=")
        key = keyword.upper()
        if key not in DSN_KEYWORDS:
            rest.append(param)
        elif key in dsn or not value:
            raise DsnParamError(f"501 5.5.4 Error: bad or repeated {key} parameter")
        else:
            dsn[key] = value
    return " ".join(rest), dsn


def without_dsn(params: str) -> str:
    """`params` less every DSN keyword (what aiosmtpd sees when one is malformed)."""
    kept = [p for p in params.split() if p.partition("=")[0].upper() not in DSN_KEYWORDS]
    return " ".join(kept)


def mail_params(dsn: dict[str, str]) -> tuple[str, str]:
    """(RET, decoded ENVID) from MAIL's DSN parameters."""
    if "NOTIFY" in dsn or "ORCPT" in dsn:
        raise DsnParamError("555 5.5.4 Error: NOTIFY and ORCPT belong to RCPT TO")
    ret = dsn.get("RET", "").upper()
    if ret not in ("", "FULL", "HDRS"):
        raise DsnParamError("501 5.5.4 Error: RET must be FULL or HDRS")
    envid = dsn.get("ENVID", "")
    if len(envid) > MAX_ENVID_CHARS:
        raise DsnParamError(f"501 5.5.4 Error: ENVID is over {MAX_ENVID_CHARS} characters")
    return ret, xtext_decode(envid)


def rcpt_params(dsn: dict[str, str]) -> tuple[str, str]:
    """(NOTIFY as upper-case words joined by ',', "addr-type;decoded address")."""
    if "RET" in dsn or "ENVID" in dsn:
        raise DsnParamError("555 5.5.4 Error: RET and ENVID belong to MAIL FROM")
    notify = ""
    if "NOTIFY" in dsn:
        words = dsn["NOTIFY"].upper().split(",")
        never = words == ["NEVER"]
        if not never and (not set(words) <= NOTIFY_WORDS or len(set(words)) != len(words)):
            raise DsnParamError(
                "501 5.5.4 Error: NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"
            )
        notify = ",".join(words)
    orcpt = ""
    if "ORCPT" in dsn:
        value = dsn["ORCPT"]
        kind, semi, address = value.partition(";")
        if len(value) > MAX_ORCPT_CHARS or not semi or _ADDR_TYPE_RE.fullmatch(kind) is None:
            raise DsnParamError("501 5.5.4 Error: ORCPT must be addr-type;xtext")
        orcpt = f"{kind};{xtext_decode(address)}"
    return notify, orcpt
