"""Async SMTP load generator that records every reply.

Used by the fault suite, `bench/chaos` and the throughput benches. Each
message is submitted once (no retries: a retry would hide a refusal) to the
next target in round-robin order; a target that refuses connections is skipped
for `dead_backoff_s`. Every attempt is recorded: Message-ID, target, reply
code, queue id (from `queued as <id>`), start and end times.

Closed loop by default (`concurrency` sessions, each starting its next message
when the last is answered: measures peak rate); open loop with `rate_per_s`
(a message starts every 1/rate seconds, at most `concurrency` in flight:
measures latency at a given load). `data_s` is the time from the DATA command
to its reply, so it includes the body upload and the commit, not the
connection setup.

Bounded by construction: at most `count` messages, and it stops starting new
ones after `duration_s`; every SMTP call has `timeout_s`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import random
import time
from dataclasses import dataclass, field

import aiosmtplib


@dataclass(frozen=True)
class Attempt:
    message_id: str
    target: str
    code: int  # SMTP reply code to DATA; -1 when the connection failed
    queue_id: str | None
    start_s: float
    end_s: float
    text: str = ""
    data_s: float = 0.0  # DATA command to its final reply; 0 when DATA was never sent


@dataclass
class LoadResult:
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def acked(self) -> dict[str, str]:
        """Message-ID -> queue id for every 250."""
        return {a.message_id: a.queue_id or "" for a in self.attempts if a.code == 250}

    def count(self, code: int) -> int:
        return sum(1 for a in self.attempts if a.code == code)

    def failover_gap_s(self, fault_s: float) -> float | None:
        """Seconds from the last 250 before `fault_s` to the first 250 after it."""
        before = [a.end_s for a in self.attempts if a.code == 250 and a.end_s <= fault_s]
        after = [a.end_s for a in self.attempts if a.code == 250 and a.end_s > fault_s]
        if not before or not after:
            return None
        return min(after) - max(before)


TEXT, ATTACHMENT, NEWSLETTER = "text", "attachment", "newsletter"
CONTENTS = (TEXT, ATTACHMENT, NEWSLETTER)


def make_body(seq: int, run_id: str, size: int, content: str = TEXT) -> tuple[str, bytes]:
    """A message of about `size` bytes, distinct per `seq`.

    `content`: TEXT, one line repeated (deflates to ~1%, as smtp-source's text does);
    ATTACHMENT, a short HTML part and a base64 file of random bytes, as mail with a PDF
    or an image looks to replication (it does not compress); NEWSLETTER, HTML paragraphs
    of words with tracking links, a slice of a pool at an offset of its own, which
    deflates at level 1 to about a third, as HTML and text mail do (`newsletter_pool`).
    """
    msg_id = f"<load-{run_id}-{seq}@mqnode.test>"
    head = (
        f"From: load@example.com\r\nTo: sink@example.org\r\nSubject: load {seq}\r\n"
        f"Message-ID: {msg_id}\r\n"
    )
    if content == ATTACHMENT:
        head += (
            'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            "--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Attached.</p>\r\n"
            '--b1\r\nContent-Type: application/pdf; name="file.pdf"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n"
        )
        fill = max(size - len(head) - 10, 0)
        b64 = base64.encodebytes(os.urandom(fill * 3 // 4 + 3)).replace(b"\n", b"\r\n")
        return msg_id, head.encode() + b64[:fill].rstrip(b"\r\n") + b"\r\n--b1--\r\n"
    if content == NEWSLETTER:
        head += "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        fill = max(size - len(head), 0)
        pool = newsletter_pool(fill)
        start = pool.index(b"\r\n", (seq * 7919) % (len(pool) - fill - 256)) + 2
        return msg_id, head.encode() + pool[start : start + fill].rstrip(b"\r\n") + b"\r\n"
    head += "\r\n"
    line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.-\r\n"
    fill = max(size - len(head), 0)
    body = (line * (fill // len(line) + 1))[:fill]
    return msg_id, (head + body).encode()


_POOL: list[bytes] = []


def newsletter_pool(fill: int) -> bytes:
    """HTML lines of at most 78 bytes, at least 2 * `fill` + 64 KiB of them: paragraphs of
    words drawn from 3,000 made-up ones (Zipf-like: a few are most of the text) with a
    tracking link of random hex in each. Built once (seeded) and grown when asked for more.
    """
    want = 2 * fill + 65536
    if _POOL and len(_POOL[0]) >= want:
        return _POOL[0]
    rnd = random.Random(1953)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    vocab = [
        "".join(rnd.choice(letters[: 8 + k % 18]) for _ in range(2 + k % 9)) for k in range(3000)
    ]
    weights = [1 / (rank + 1) for rank in range(len(vocab))]
    lines: list[str] = []
    size = 0
    while size < want:
        words = rnd.choices(vocab, weights, k=rnd.randint(40, 120))
        link = f'<a href="https://news.example.com/t/{rnd.getrandbits(96):024x}">more</a>'
        para = '<p style="margin:0 0 12px;font-family:Arial">' + " ".join(words) + f" {link}</p>"
        line = ""
        for word in para.split(" "):
            if line and len(line) + 1 + len(word) > 76:
                lines.append(line)
                size += len(line) + 2
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
        size += len(line) + 2
    _POOL[:] = [("\r\n".join(lines) + "\r\n").encode()]
    return _POOL[0]


class LoadGen:
    def __init__(
        self,
        targets: list[tuple[str, int]],
        concurrency: int = 10,
        size: int = 1024,
        recipients: int = 1,
        timeout_s: float = 15.0,
        dead_backoff_s: float = 0.5,
        run_id: str | None = None,
        rate_per_s: float | None = None,
        content: str = TEXT,
    ) -> None:
        self.targets = targets
        self.content = content
        self.concurrency = concurrency
        self.size = size
        self.recipients = recipients
        self.timeout_s = timeout_s
        self.dead_backoff_s = dead_backoff_s
        self.run_id = run_id or str(time.time_ns())
        self.rate_per_s = rate_per_s
        self.result = LoadResult()
        self._dead_until: dict[tuple[str, int], float] = {}
        self._rr = itertools.cycle(range(len(targets)))
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def _pick(self) -> tuple[str, int]:
        now = time.monotonic()
        for _ in range(len(self.targets)):
            t = self.targets[next(self._rr)]
            if self._dead_until.get(t, 0.0) <= now:
                return t
        return self.targets[next(self._rr)]

    async def run(self, count: int, duration_s: float) -> LoadResult:
        if self.rate_per_s is not None:
            return await self._run_open(count, duration_s, self.rate_per_s)
        seqs = iter(range(count))
        deadline = time.monotonic() + duration_s

        async def worker() -> None:
            for seq in seqs:
                if self._stop.is_set() or time.monotonic() >= deadline:
                    return
                await self._one(seq)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return self.result

    async def _run_open(self, count: int, duration_s: float, rate_per_s: float) -> LoadResult:
        slots = asyncio.Semaphore(self.concurrency)
        tasks: list[asyncio.Task[None]] = []
        start = time.monotonic()
        deadline = start + duration_s

        async def one(seq: int) -> None:
            try:
                await self._one(seq)
            finally:
                slots.release()

        for seq in range(count):
            due = start + seq / rate_per_s
            if self._stop.is_set() or due >= deadline:
                break
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            await slots.acquire()
            tasks.append(asyncio.create_task(one(seq)))
        await asyncio.gather(*tasks)
        return self.result

    async def _one(self, seq: int) -> None:
        target = self._pick()
        msg_id, body = make_body(seq, self.run_id, self.size, self.content)
        rcpts = [f"user{r}@example.org" for r in range(self.recipients)]
        start = time.monotonic()
        code, text, data_s = -1, "", 0.0
        client = aiosmtplib.SMTP(hostname=target[0], port=target[1], timeout=self.timeout_s)
        try:
            await client.connect()
            try:
                await client.mail("load@example.com")
                for rcpt in rcpts:
                    await client.rcpt(rcpt)
                data_at = time.monotonic()
                reply = await client.data(body)
                data_s = time.monotonic() - data_at
                code, text = reply.code, reply.message
            except aiosmtplib.SMTPResponseException as exc:
                code, text = exc.code, exc.message
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            code, text = -1, str(exc)
            self._dead_until[target] = time.monotonic() + self.dead_backoff_s
        finally:
            if client.is_connected:
                client.close()
        queue_id = text.rsplit(" ", 1)[-1] if code == 250 and "queued as" in text else None
        where = f"{target[0]}:{target[1]}"
        end = time.monotonic()
        self.result.attempts.append(
            Attempt(msg_id, where, code, queue_id, start, end, text, data_s)
        )
