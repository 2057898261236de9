"""notify: which outcomes the sender hears of, and the DSN that tells it.

`report_for()` is the one place that turns an attempt's per-recipient
outcomes into the notification queued with them (RecordOutcome's bounce), for
the dispatcher and for an operator's bounce alike:

* a bounced recipient is reported (`Action: failed`) unless its client gave
  NOTIFY without FAILURE (spool/dsnparams.py);
* a delivered recipient whose client asked NOTIFY=SUCCESS is reported
  (`Action: relayed`, RFC 3464's word for a hand-over to a host that does
  not speak DSN) unless the host took the DSN parameters (`dsn_passed`);
* nothing for the null sender (a bounce never bounces), nor for deferrals.

The report returns the original whole (RET=FULL or none, up to the size
bound) only when something failed and the client did not ask RET=HDRS;
otherwise its header block. ENVID and ORCPT come back as the report's
Original-Envelope-Id and Original-Recipient.
"""

from __future__ import annotations

from collections.abc import Callable

from mqnode.dsn.report import FailedRecipient, build_dsn, is_null_sender, status_from_reply
from mqnode.spool.model import Outcome, QueuedMessage, RecipientResult

REPORT_MAX_RETURNED_BYTES = 16 * 1024  # the report must fit one small log entry


def report_for(
    msg: QueuedMessage,
    results: list[RecipientResult],
    remote: dict[int, str],
    body: bytes,
    now_ms: int,
    hostname: str,
    dsn_queue_id: str,
    dsn_passed: frozenset[int] = frozenset(),
    sign: Callable[[bytes, int], bytes] | None = None,
) -> bytes:
    """The DSN for the outcomes in `results` the sender asked to hear of (b"" if none).

    `sign(report, at_s)`: DKIM-Signature headers for it (DkimSigner.sign_report), put
    on top; the report's From is MAILER-DAEMON@`hostname`, so a key for that domain
    signs it.
    """
    if is_null_sender(msg.mail_from):
        return b""
    request = msg.dsn
    reported: list[FailedRecipient] = []
    for i, outcome, reply in results:
        if outcome == Outcome.BOUNCED.value and request.wants_failure(i):
            action, status = "failed", status_of(reply)
        elif (
            outcome == Outcome.DELIVERED.value and request.wants_success(i) and i not in dsn_passed
        ):
            action, status = "relayed", "2.0.0"
        else:
            continue
        reported.append(
            FailedRecipient(
                address=msg.recipients[i].address,
                status=status,
                diagnostic=reply,
                remote_mta=remote.get(i, ""),
                action=action,
                original_recipient=request.original_address(i),
            )
        )
    if not reported:
        return b""
    failed = any(r.action == "failed" for r in reported)
    report = build_dsn(
        queue_id=msg.queue_id,
        reporting_mta=hostname,
        original_sender=msg.mail_from,
        original_message_id=msg.message_id,
        arrival_ms=msg.received_ms,
        now_ms=now_ms,
        failed=reported,
        original=body,
        max_returned_bytes=REPORT_MAX_RETURNED_BYTES,
        envelope_id=request.envid,
        headers_only=not failed or request.ret == "HDRS",
    )
    return report if sign is None else sign(report, now_ms // 1000) + report


def status_of(reply: str) -> str:
    """Enhanced status of a reply; our own replies ("5.1.10 ...", "4.4.7 ...") start with it."""
    head = reply.split(" ", 1)[0]
    parts = head.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and head[0] in "45":
        return head
    return status_from_reply(reply, "5.0.0")
