"""Signing at ingress: the signed bytes are what is queued; a failure is a 451, never an
unsigned message; a retry of the same message is the same queue entry."""

from __future__ import annotations

from pathlib import Path

import dkim

from mqnode.clock import ManualClock
from mqnode.signing.dkim_signer import DkimSigner, SigningError
from mqnode.signing.keys import ED25519, KeySet, keygen
from mqnode.smtp.handler import SmtpIngress
from mqnode.spool.store import QueueStore

from .kit import Applies, smtp_data

BODY = b"From: A <a@example.org>\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


def _ingress(
    store: QueueStore, signer: DkimSigner, clock: ManualClock
) -> tuple[SmtpIngress, Applies]:
    rep = Applies(store)
    ing = SmtpIngress(
        rep, clock, lambda n: b"\1" * n, "n1", "test.local", ["127.0.0.0/8"], 10, lambda: 0.0,
        signer=signer,
    )  # fmt: skip
    return ing, rep


def _data(ing: SmtpIngress, body: bytes = BODY) -> str:
    return smtp_data(ing, body, rcpt="b@example.net")


def test_the_queued_bytes_carry_a_signature_with_t_the_receive_time(
    store: QueueStore, tmp_path: Path
) -> None:
    key = keygen("example.org", "s", ED25519, 0, tmp_path)
    clock = ManualClock(wall_ms=1_796_540_000_123)
    ing, _ = _ingress(store, DkimSigner(KeySet([key])), clock)
    assert _data(ing).startswith("250")
    (msg,) = store.list_messages(10)
    stored = store.read_body(msg)
    assert stored.startswith(b"DKIM-Signature: ") and b"t=1796540000;" in stored
    assert stored.endswith(BODY)
    assert dkim.DKIM(stored).verify(dnsfunc=lambda name, timeout=5: key.txt_record().encode())
    assert ing.dkim_signed == {"example.org": 1}
    # a retry of the same message later (the client never saw the 250): the same entry
    clock.advance(30)
    assert _data(ing) == f"250 2.0.0 Ok: queued as {msg.queue_id}"
    assert len(store.list_messages(10)) == 1


class _Broken(DkimSigner):
    def sign(self, message: bytes, at_s: int) -> tuple[bytes, tuple[str, ...]]:
        raise SigningError("DKIM signing failed: the key went away")


def test_a_message_that_cannot_be_signed_is_refused_with_451_not_sent_unsigned(
    store: QueueStore, tmp_path: Path
) -> None:
    key = keygen("example.org", "s", ED25519, 0, tmp_path)
    ing, rep = _ingress(store, _Broken(KeySet([key])), ManualClock())
    reply = _data(ing)
    assert reply.startswith("451 4.3.0") and "not signed" in reply
    assert rep.cmds == [] and store.list_messages(10) == []
    assert ing.dkim_failed == 1 and ing.refused == 1
