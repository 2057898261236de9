"""An HTTP load generator for the injection API: `python -m bench.apiload URL TOKEN ...`.

`--concurrency` requests in flight on kept-alive connections (aiohttp), each a raw
message of `--size` bytes, or with `--batch N` a structured template for N recipients
with a substitution each. A request answered 503 or 429 (back-pressure) is sent again
with the same Idempotency-Key after its Retry-After (at most 1 s), as a client should.
Stops after `--messages` messages or `--max-s` seconds, whichever comes first, and
prints one JSON line: messages queued, seconds, requests refused and retried. Run as
its own process, as smtp-source is, so that its CPU is not the node's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp

RETRIES = 5


def _raw(size: int, i: int) -> dict[str, Any]:
    head = f"From: load@api.bench.test\r\nTo: u@bench.test\r\nSubject: load {i}\r\n\r\n"
    body = ("x" * 76 + "\r\n") * max(1, (size - len(head)) // 78)
    return {"raw": head + body, "envelope": {"from": "load@api.bench.test", "to": ["u@bench.test"]}}


def _batch(size: int, n: int, i: int) -> dict[str, Any]:
    return {
        "from": "load@api.bench.test",
        "subject": "load {{n}}",
        "text": ("x" * 76 + "\n") * max(1, size // 78),
        "recipients": [{"to": f"u{k}@bench.test", "vars": {"n": i * n + k}} for k in range(n)],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    per_request = max(1, args.batch)
    requests = max(1, args.messages // per_request)
    headers = {"Authorization": f"Bearer {args.token}"}
    deadline = time.monotonic() + args.max_s
    done = refused = retried = 0
    next_i = 0
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as s:

        async def worker() -> None:
            nonlocal done, refused, retried, next_i
            while next_i < requests and time.monotonic() < deadline:
                i = next_i
                next_i += 1
                doc = _batch(args.size, per_request, i) if args.batch else _raw(args.size, i)
                key = {"Idempotency-Key": f"load-{args.run}-{i}"}
                for _ in range(RETRIES):  # as a client would: 503/429 -> again, same key
                    async with s.post(args.url, json=doc, headers=key) as resp:
                        await resp.read()
                        retry_s = float(resp.headers.get("Retry-After", "1"))
                    if resp.status == 200:
                        done += per_request
                        break
                    if resp.status not in (429, 503) or time.monotonic() > deadline:
                        refused += 1
                        break
                    retried += 1
                    await asyncio.sleep(min(retry_s, 1.0))
                else:
                    refused += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.monotonic() - t0
    return {"messages": done, "seconds": elapsed, "refused": refused, "retried": retried}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("token")
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--max-s", type=float, default=90.0)
    p.add_argument("--run", default=str(time.time_ns()), help="idempotency keys' prefix")
    print(json.dumps(asyncio.run(run(p.parse_args()))))


if __name__ == "__main__":
    main()
