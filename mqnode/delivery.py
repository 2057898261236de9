"""DeliveryAgent: one SMTP transaction with aiosmtplib, replies mapped to per-recipient outcomes.

2xx -> delivered, 5xx -> bounced, 4xx or any connection/protocol failure ->
deferred. STARTTLS is used when the server offers it (opportunistic, no
certificate check: the same stance as Postfix's `may` level).
"""

from __future__ import annotations

import ssl

import aiosmtplib

from .model import Outcome

RecipientResult = tuple[int, str, str]


def _outcome_for(code: int) -> Outcome:
    if 200 <= code < 300:
        return Outcome.DELIVERED
    if 500 <= code < 600:
        return Outcome.BOUNCED
    return Outcome.DEFERRED


class DeliveryAgent:
    def __init__(self, helo_hostname: str, timeout_s: float = 30.0) -> None:
        self._helo = helo_hostname
        self._timeout_s = timeout_s
        self._tls = ssl.create_default_context()
        self._tls.check_hostname = False
        self._tls.verify_mode = ssl.CERT_NONE

    async def deliver(
        self, host: str, port: int, mail_from: str, rcpts: list[tuple[int, str]], body: bytes
    ) -> list[RecipientResult]:
        """Deliver `body` to the (index, address) recipients; never raises on SMTP errors."""
        client = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            timeout=self._timeout_s,
            local_hostname=self._helo,
            start_tls=False,
            tls_context=self._tls,
        )
        try:
            await client.connect()
            await client.ehlo()
            if client.supports_extension("starttls"):
                await client.starttls()
                await client.ehlo()
            return await self._transaction(client, mail_from, rcpts, body)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return [(i, Outcome.DEFERRED.value, f"connection failed: {exc}") for i, _ in rcpts]
        finally:
            if client.is_connected:
                try:
                    await client.quit()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()

    async def _transaction(
        self, client: aiosmtplib.SMTP, mail_from: str, rcpts: list[tuple[int, str]], body: bytes
    ) -> list[RecipientResult]:
        try:
            await client.mail(mail_from)
        except aiosmtplib.SMTPResponseException as exc:
            out = _outcome_for(exc.code).value
            return [(i, out, f"MAIL: {exc.code} {exc.message}") for i, _ in rcpts]
        results: dict[int, RecipientResult] = {}
        accepted: list[int] = []
        for idx, addr in rcpts:
            try:
                await client.rcpt(addr)
                accepted.append(idx)
            except aiosmtplib.SMTPResponseException as exc:
                results[idx] = (idx, _outcome_for(exc.code).value, f"{exc.code} {exc.message}")
        if accepted:
            try:
                resp = await client.data(body)
                reply = f"{resp.code} {resp.message}"
                for idx in accepted:
                    results[idx] = (idx, _outcome_for(resp.code).value, reply)
            except aiosmtplib.SMTPResponseException as exc:
                for idx in accepted:
                    results[idx] = (idx, _outcome_for(exc.code).value, f"{exc.code} {exc.message}")
        return [results[i] for i, _ in rcpts]
