"""The injection API's request checks and message building, fuzzed: any JSON value gives
messages or a Problem naming a field (never another exception), and what is built parses
back as what was asked for."""

from __future__ import annotations

import base64
import email
import email.policy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqnode.api.compose import Limits
from mqnode.api.problems import Problem
from mqnode.api.server import InjectionApi
from mqnode.clock import ManualClock

LIMITS = Limits(
    max_message_bytes=200_000,
    max_recipients=50,
    max_header_count=100,
    max_batch=20,
    hostname="mq.test",
)
T0 = 1_800_000_000_000


def _api() -> InjectionApi:
    counter = iter(range(10**9))
    return InjectionApi(
        None,  # type: ignore[arg-type]  # drafts() never submits
        LIMITS,
        ManualClock(),
        lambda n: next(counter).to_bytes(n, "big"),
        lambda: 0.0,
    )


API = _api()
texts = st.text(max_size=40)
addresses = (
    st.sampled_from(
        [
            "a@x.test",
            "Ann <ann@x.test>",
            "bad",
            "",
            "a@",
            "@x.test",
            "ü@x.test",
            "a@x.test, b@x.test",
        ]
    )
    | texts
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
fields = {
    "from": addresses | st.fixed_dictionaries({"email": addresses}),
    "to": st.lists(addresses, max_size=3),
    "cc": st.lists(addresses, max_size=2),
    "bcc": st.lists(addresses, max_size=2),
    "subject": texts,
    "text": texts,
    "html": texts,
    "headers": st.dictionaries(st.sampled_from(["X-A", "From", "Bad Name", "x:y"]), texts),
    "attachments": st.lists(
        st.fixed_dictionaries({"filename": texts, "content": st.sampled_from(["aGk=", "@@", ""])}),
        max_size=2,
    ),
    "raw": texts | st.integers(990, 1010).map(lambda n: "S: x\r\n\r\n" + "a" * n),
    "envelope": st.fixed_dictionaries({"from": addresses, "to": st.lists(addresses, max_size=2)}),
    "recipients": st.lists(
        st.fixed_dictionaries(
            {"to": addresses},
            optional={"vars": st.dictionaries(st.sampled_from(["name", "x"]), texts)},
        ),
        max_size=3,
    ),
    "bogus": json_values,
}
requests = st.fixed_dictionaries({}, optional=fields) | json_values


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_any_request_gives_messages_or_a_problem_naming_a_field(doc: Any) -> None:
    try:
        drafts = API.drafts(doc, T0)
    except Problem as problem:
        assert 400 <= problem.status < 500
        assert problem.detail and "\n" not in problem.detail
        return
    assert drafts
    for d in drafts:
        assert d.rcpts and len(d.body) <= LIMITS.max_message_bytes
        assert d.body.endswith(b"\r\n") and b"\n" not in d.body.replace(b"\r\n", b"")
        assert max(len(line) for line in d.body.split(b"\r\n")) <= 998  # RFC 5322 2.1.1
        if "raw" not in doc:
            parsed = email.message_from_bytes(d.body, policy=email.policy.default)
            assert parsed["Message-ID"] and parsed["Date"] and parsed["From"]
            assert "Bcc" not in parsed


@given(st.dictionaries(st.sampled_from(["name", "code"]), texts.filter(lambda t: "{{" not in t)))
def test_batch_substitutions_land_where_asked(values: dict[str, str]) -> None:
    doc = {
        "from": "a@x.test",
        "subject": "s",
        "text": "".join(f"[{{{{{k}}}}}]" for k in sorted(values)) or "t",
        "recipients": [{"to": "r@x.test", "vars": values}],
    }
    (draft,) = API.drafts(doc, T0)
    parsed = email.message_from_bytes(draft.body, policy=email.policy.default)
    body = str(parsed.get_content()).replace("\r\n", "\n")
    for k in sorted(values):
        assert f"[{values[k]}]" in body or not values[k].isprintable()


def test_a_raw_message_with_a_line_over_998_bytes_is_refused() -> None:
    """As SMTP's DATA refuses it (500 5.5.2): a receiver may refuse or break such a line."""
    env = {"from": "a@x.test", "to": ["b@x.test"]}
    ok = API.drafts({"raw": "Subject: x\n\n" + "a" * 998, "envelope": env}, T0)
    assert ok[0].body.endswith(b"a" * 998 + b"\r\n")
    for doc in (
        {"raw": "Subject: x\r\n\r\n" + "a" * 999 + "\r\n", "envelope": env},
        {"raw_base64": base64.b64encode(b"Subject: " + b"x" * 999).decode(), "envelope": env},
    ):
        try:
            API.drafts(doc, T0)
        except Problem as problem:
            assert problem.status == 422 and "998" in problem.detail
            assert problem.errors == [("/raw" if "raw" in doc else "/raw_base64", "line too long")]
        else:
            raise AssertionError("accepted")


def test_a_raw_message_that_made_too_many_hops_is_refused() -> None:
    env = {"from": "a@x.test", "to": ["b@x.test"]}
    hops = "".join(f"Received: from h{i} by h{i}; date\r\n" for i in range(LIMITS.hopcount_limit))
    try:
        API.drafts({"raw": hops + "Subject: s\r\n\r\nbody\r\n", "envelope": env}, T0)
    except Problem as problem:
        assert problem.status == 422 and problem.errors == [("/raw", "too many hops")]
    else:
        raise AssertionError("accepted")
    assert API.drafts({"raw": hops[hops.index("\n") + 1 :] + "\r\nb", "envelope": env}, T0)
