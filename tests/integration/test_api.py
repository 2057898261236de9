"""The HTTP injection API on real nodes: structured, raw and batch messages delivered to
a real receiver and parsed; answers only after the commit (kill -9 of the leader right
after a 200 loses nothing); Idempotency-Key across a failover; malformed requests refused
with problem documents and nothing queued."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.api import post_json, write_principals
from tests.support.cluster import ADMIN_TOKEN, FAST_TUNING, Cluster
from tests.support.smtpsink import Sink, SinkHost, bind_common_port

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _delivered(c: Cluster, sink: Sink, n: int, timeout_s: float = 30) -> list[Any]:
    def probe() -> tuple[bool | None, str]:
        got = [d for d in sink.delivered()]
        return (True if len(got) >= n else None), f"{len(got)} of {n} delivered"

    c.poll(f"{n} messages delivered", probe, timeout_s)
    return [
        email.message_from_bytes(d.content, policy=email.policy.default) for d in sink.delivered()
    ]


def _text(part: Any) -> str:
    return str(part.get_content()).replace("\r\n", "\n")


def _cluster(
    tmp_path: Path, port: int, extra: list[str] | None = None
) -> tuple[Cluster, dict[str, str]]:
    tokens = write_principals(
        tmp_path / "principals.toml",
        {"app": ["submit"], "watcher": ["view"], "slow": ["submit"]},
        {"slow": 2},
    )
    args = [*FAST_TUNING, "--principals-file", str(tmp_path / "principals.toml"), *(extra or [])]
    c = Cluster(tmp_path / "c", n=3, extra_args=args, relay_host=f"127.0.0.1:{port}")
    return c, tokens


def test_structured_raw_and_batch_messages_are_delivered_as_built(tmp_path: Path) -> None:
    port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        sink = host.add("receiver", socks["127.0.0.1"])
        c, tokens = _cluster(tmp_path, port)
        api_port = _free_port()
        c.nodes[0].extra_args += ["--api-addr", f"127.0.0.1:{api_port}"]
        with c:
            follower = c.followers()[0]
            url = f"{c.nodes[follower].admin_url}/v1/messages"  # any node; the admin port too
            doc = {
                "from": {"email": "news@shop.test", "name": "Shop News"},
                "to": ["Ann <ann@x.test>"],
                "cc": ["cid@x.test"],
                "bcc": ["hidden@x.test"],
                "reply_to": "help@shop.test",
                "subject": "Grüße from the shop",
                "text": "plain words\n",
                "html": "<p>html words</p>",
                "headers": {"X-Campaign": "winter", "List-Unsubscribe": "<mailto:u@shop.test>"},
                "attachments": [
                    {
                        "filename": "price list.csv",
                        "content_type": "text/csv",
                        "content": base64.b64encode(b"item,price\r\nhat,3\r\n").decode(),
                    }
                ],
            }
            status, answer, _ = post_json(url, doc, tokens["app"])
            assert status == 200, answer
            (msg_info,) = answer["messages"]
            assert msg_info["recipients"] == ["ann@x.test", "cid@x.test", "hidden@x.test"]
            assert not msg_info["duplicate"] and answer["refused"] == []
            (got,) = _delivered(c, sink, 1)
            assert got["Subject"] == "Grüße from the shop"
            assert got["From"].addresses[0].addr_spec == "news@shop.test"
            assert "Bcc" not in got and got["X-Campaign"] == "winter"
            assert got["Message-ID"] == msg_info["message_id"]
            assert got["Date"] is not None and "with HTTP id" in str(got["Received"])
            assert _text(got.get_body(("plain",))) == "plain words\n"
            assert _text(got.get_body(("html",))).strip() == "<p>html words</p>"
            (att,) = list(got.iter_attachments())
            assert att.get_filename() == "price list.csv"
            assert att.get_content() in ("item,price\r\nhat,3\r\n", "item,price\nhat,3\n")
            rcpts = sorted(r for d in sink.delivered() for r in d.rcpts)
            assert rcpts == ["ann@x.test", "cid@x.test", "hidden@x.test"]

            # Raw, on the API's own listener; the envelope as given.
            raw = "From: a@shop.test\nTo: z@x.test\nSubject: raw one\n\nbody line\n"
            api = f"http://127.0.0.1:{api_port}/v1/messages"
            doc2 = {"raw": raw, "envelope": {"from": "bounce@shop.test", "to": ["z@x.test"]}}
            status, answer, _ = post_json(api, doc2, tokens["app"])
            assert status == 200, answer
            delivered = _delivered(c, sink, 2)
            last = next(d for d in sink.delivered() if d.rcpts == ("z@x.test",))
            assert last.mail_from == "bounce@shop.test"
            assert b"\r\nSubject: raw one\r\n" in last.content
            assert b"Message-ID:" in last.content  # added: none was given
            assert len(delivered) == 2

            # A big text body: deflated where the API takes it, delivered as it was.
            words = "".join(f"line {i} of a long newsletter, said again\n" for i in range(5000))
            doc3 = {
                "raw": f"From: a@shop.test\nTo: y@x.test\nSubject: big\n\n{words}",
                "envelope": {"from": "bounce@shop.test", "to": ["y@x.test"]},
            }
            status, answer, _ = post_json(api, doc3, tokens["app"])
            assert status == 200, answer
            _delivered(c, sink, 3)
            big = next(d for d in sink.delivered() if d.rcpts == ("y@x.test",))
            assert big.content.endswith(b"\r\n\r\n" + words.replace("\n", "\r\n").encode())

            # A batch: one message per recipient, its own substitutions.
            batch = {
                "from": "news@shop.test",
                "subject": "Hello {{name}}",
                "text": "Your code is {{ code }}.\n",
                "recipients": [
                    {"to": f"r{i}@x.test", "vars": {"name": f"R{i}", "code": i * 11}}
                    for i in range(5)
                ],
            }
            status, answer, _ = post_json(api, batch, tokens["app"])
            assert status == 200, answer
            assert len({m["queue_id"] for m in answer["messages"]}) == 5
            _delivered(c, sink, 8)
            for i in range(5):
                d = next(d for d in sink.delivered() if d.rcpts == (f"r{i}@x.test",))
                m = email.message_from_bytes(d.content, policy=email.policy.default)
                assert m["Subject"] == f"Hello R{i}" and m["To"] == f"r{i}@x.test"
                assert _text(m) == f"Your code is {i * 11}.\n"


def test_refusals_are_problem_documents_and_queue_nothing(tmp_path: Path) -> None:
    port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        host.add("receiver", socks["127.0.0.1"])
        c, tokens = _cluster(tmp_path, port, ["--max-message-bytes", "200000"])
        with c:
            url = f"{c.nodes[0].admin_url}/v1/messages"
            good = {"from": "a@shop.test", "to": ["b@x.test"], "text": "hi"}
            cases: list[tuple[str, Any, dict[str, Any], int, str]] = [
                ("no credentials", good, {"token": ""}, 401, ""),
                ("a view principal", good, {"token": tokens["watcher"]}, 403, ""),
                ("not JSON", None, {"raw": b"{nope", "ct": "application/json"}, 400, ""),
                ("deep nesting", None, {"raw": b"[" * 100_000, "ct": "application/json"}, 400, ""),
                ("form data", None, {"raw": b"a=b", "ct": "application/x-www-form-urlencoded"}, 415, ""),  # noqa: E501
                ("unknown field", {**good, "bogus": 1}, {}, 422, "/"),
                ("bad address", {**good, "to": ["not an address"]}, {}, 422, "/to/0"),
                ("header injection", {**good, "subject": "x\r\nBcc: evil@x.test"}, {}, 422, "/subject"),  # noqa: E501
                ("reserved header", {**good, "headers": {"From": "x@y.test"}}, {}, 422, "/headers/From"),  # noqa: E501
                ("bad base64", {**good, "attachments": [{"filename": "f", "content": "@@"}]}, {}, 422, "/attachments/0/content"),  # noqa: E501
                ("missing var", {"from": "a@shop.test", "text": "{{x}}", "recipients": [{"to": "b@x.test"}]}, {}, 422, "/recipients/0/vars"),  # noqa: E501
                ("too large", {**good, "text": "x" * 300_000}, {}, 413, ""),
                ("raw without envelope", {"raw": "Subject: x\n\nhi\n"}, {}, 422, "/envelope"),
            ]  # fmt: skip
            for name, doc, opts, want, where in cases:
                token = opts.get("token", tokens["app"])
                status, answer, headers = post_json(
                    url,
                    doc,
                    token,
                    raw=opts.get("raw"),
                    content_type=opts.get("ct", "application/json"),
                )
                assert status == want, (name, status, answer)
                assert headers.get("Content-Type", "").startswith("application/problem+json"), name
                assert answer["status"] == want and answer["title"] and answer["detail"], name
                if where:
                    pointers = [e["pointer"] for e in answer.get("errors", [])]
                    assert where in pointers, (name, answer)
            assert c.queue_ids(0) == [], "a refused request queued something"
            # A principal over its rate: 429 with Retry-After, per principal.
            for _ in range(2):
                assert post_json(url, good, tokens["slow"])[0] == 200
            status, answer, headers = post_json(url, good, tokens["slow"])
            assert status == 429 and "api_rate_per_min" in answer["detail"], answer
            assert int(headers["Retry-After"]) > 0
            # The node is fine afterwards, and other principals unaffected.
            status, answer, _ = post_json(url, good, tokens["app"])
            assert status == 200, answer


def test_a_200_survives_kill_9_of_the_leader_and_a_keyed_retry_queues_nothing(
    tmp_path: Path,
) -> None:
    port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        sink = host.add("receiver", socks["127.0.0.1"], reply_delay_s=0.3)
        c, tokens = _cluster(tmp_path, port)
        with c:
            lead = c.leader()
            doc = {
                "from": "a@shop.test",
                "subject": "s {{n}}",
                "text": "t",
                "recipients": [{"to": f"k{i}@x.test", "vars": {"n": i}} for i in range(20)],
            }
            key = {"Idempotency-Key": "order-4711"}
            url = f"{c.nodes[lead].admin_url}/v1/messages"
            status, first, _ = post_json(url, doc, tokens["app"], key)
            assert status == 200, first
            c.kill(lead)  # right after the answer: the messages are committed
            new = c.wait_for_leader(among=[i for i in range(3) if i != lead])
            other = f"{c.nodes[new].admin_url}/v1/messages"
            status, again, _ = post_json(other, doc, tokens["app"], key)
            assert status == 200, again
            assert [m["queue_id"] for m in again["messages"]] == [
                m["queue_id"] for m in first["messages"]
            ]
            assert all(m["duplicate"] for m in again["messages"])
            # Another principal with the same key is another request.
            c.restart(lead)
            _delivered(c, sink, 20, timeout_s=60)
            time.sleep(2)  # anything sent twice would have arrived by now
            rcpts = [r for d in sink.delivered() for r in d.rcpts]
            assert sorted(set(rcpts)) == sorted(f"k{i}@x.test" for i in range(20))
            dupes = {r for r in rcpts if rcpts.count(r) > 1}
            # A failover may resend what was in flight at the kill (docs/reliability.md);
            # it never sends a second copy of a keyed retry.
            ids = {d.message_id for d in sink.delivered()}
            assert len(ids) == 20, (dupes, ids)


def test_openapi_document_is_served_and_describes_the_route(tmp_path: Path) -> None:
    port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        host.add("receiver", socks["127.0.0.1"])
        c, _ = _cluster(tmp_path, port)
        c.nodes = c.nodes[:1]
        c.nodes[0].peers = []
        with c:
            import urllib.request

            with urllib.request.urlopen(f"{c.nodes[0].admin_url}/v1/openapi.json") as resp:
                doc = json.loads(resp.read())
            assert doc["openapi"].startswith("3.1")
            assert "post" in doc["paths"]["/v1/messages"]


def test_a_keyed_retry_maps_each_message_to_its_first_id_after_a_suppression(
    tmp_path: Path,
) -> None:
    """Message i of a request is keyed by its place in the request, not among those left
    after suppression: a recipient suppressed between a request and its retry does not
    shift the others onto each other's ids."""
    port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        host.add("receiver", socks["127.0.0.1"])
        c, tokens = _cluster(tmp_path, port)
        with c:
            url = f"{c.nodes[0].admin_url}/v1/messages"
            doc = {
                "from": "a@shop.test",
                "subject": "s",
                "text": "t",
                "recipients": [{"to": "first@x.test"}, {"to": "second@x.test"}],
            }
            key = {"Idempotency-Key": "k-1"}
            status, first, _ = post_json(url, doc, tokens["app"], key)
            assert status == 200, first
            ids = {m["recipients"][0]: m["queue_id"] for m in first["messages"]}
            add = {"entries": [{"target": "first@x.test", "reason": "asked"}]}
            status, answer, _ = post_json(
                f"{c.nodes[0].admin_url}/suppressions/add", add, ADMIN_TOKEN
            )
            assert status == 200, answer

            def retried() -> tuple[dict[str, Any] | None, str]:
                status, again, _ = post_json(url, doc, tokens["app"], key)
                done = status == 200 and again["refused"]
                return (again if done else None), f"HTTP {status}: {again}"

            again = c.poll("the retry to see the suppression", retried, 20)
            assert [r["recipient"] for r in again["refused"]] == ["first@x.test"]
            (second,) = again["messages"]
            assert second["recipients"] == ["second@x.test"] and second["duplicate"]
            assert second["queue_id"] == ids["second@x.test"]


def test_a_request_of_millions_of_json_values_is_refused_and_the_leader_keeps_leading(
    tmp_path: Path,
) -> None:
    # 20 MiB of [[],[],...]: json.loads built ~7 million lists in C for three seconds
    # without letting the Raft thread run, and the leader lost its leadership to it.
    port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        sink = host.add("receiver", socks["127.0.0.1"])
        c, tokens = _cluster(tmp_path, port)
        api_ports = [_free_port() for _ in c.nodes]
        for node, api_port in zip(c.nodes, api_ports, strict=True):
            node.extra_args += ["--api-addr", f"127.0.0.1:{api_port}"]
        with c:
            lead = c.leader()
            term = c.status(lead)["term"]
            hostile = b"[" + b"[]," * (20 * 1024 * 1024 // 3) + b"[]]"
            api = f"http://127.0.0.1:{api_ports[lead]}/v1/messages"
            status, answer, _ = post_json(api, None, tokens["app"], raw=hostile, timeout_s=60)
            assert status == 413 and "values" in answer["detail"], (status, answer)
            # A big message fits on the admin endpoint too (its own routes take 1 MiB).
            words = "lorem ipsum, dolor sit amet\n" * 80_000  # 2.2 MB
            doc = {
                "raw": f"From: a@shop.test\nSubject: big\n\n{words}",
                "envelope": {"from": "a@shop.test", "to": ["z@x.test"]},
            }
            admin_api = f"{c.nodes[lead].admin_url}/v1/messages"
            status, answer, _ = post_json(admin_api, doc, tokens["app"], timeout_s=60)
            assert status == 200, answer
            assert (c.leader(), c.status(lead)["term"]) == (lead, term)
            _delivered(c, sink, 1)
