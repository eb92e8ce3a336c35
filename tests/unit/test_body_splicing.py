"""Changing a request body without re-serialising it, and reading a response's usage without
parsing all of it (gateway.dialects.base: splice_field, top_level_fields): both must agree with a
full JSON parse, or decline and let the caller parse."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.dialects.base import splice_field, top_level_fields
from gateway.dialects.openai import OpenAIDialect

MEMBER = b'"stream_options":{"include_usage":true}'
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
_json = st.recursive(st.none() | st.booleans() | st.integers() | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=10)
_bodies = st.dictionaries(_text.filter(lambda k: k != "stream_options"), _json, max_size=5)


@given(_bodies, st.booleans(), st.sampled_from(["", " ", "\n", "\r\n\t "]))
def test_a_spliced_body_parses_to_the_body_plus_the_member(body: dict[str, Any], ascii_only: bool, pad: str) -> None:
    raw = (pad + json.dumps(body, ensure_ascii=ascii_only) + pad).encode()
    spliced = splice_field(raw, MEMBER)
    assert spliced is not None
    assert json.loads(spliced) == {**body, "stream_options": {"include_usage": True}}


def test_bodies_that_are_not_plain_utf8_objects_are_left_to_the_caller() -> None:
    assert splice_field('{"a": 1}'.encode("utf-16"), MEMBER) is None
    assert splice_field(b"\xef\xbb\xbf{}", MEMBER) is None
    assert splice_field(b"[]", MEMBER) is None
    assert splice_field(b"{}", MEMBER) == b"{" + MEMBER + b"}"


def _answer(**extra: Any) -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "hi"}}],
            **extra}


USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}


@given(_bodies, st.booleans(), st.booleans())
def test_fields_found_in_place_are_the_fields_a_full_parse_finds(noise: dict[str, Any], usage_first: bool,
                                                                  tier: bool) -> None:
    noise = {k: v for k, v in noise.items() if k not in ("usage", "service_tier")}
    head = {"usage": USAGE} if usage_first else {}
    tail = {} if usage_first else {"usage": USAGE}
    obj = {**head, **noise, **_answer(), **tail, **({"service_tier": "default"} if tier else {})}
    raw = json.dumps(obj, ensure_ascii=False).encode()
    found = top_level_fields(raw, (b"usage", b"service_tier"))
    if found is not None:  # declining is always allowed; an answer must be the full parse's
        assert found == {k: obj[k] for k in ("usage", "service_tier") if k in obj}


def test_ambiguous_answers_are_parsed_in_full() -> None:
    nested = json.dumps(_answer(usage=USAGE, meta={"usage": {"prompt_tokens": 1}})).encode()
    assert top_level_fields(nested, (b"usage",)) is None  # a second "usage" key: could be the nested one
    escaped = b'{"\\u0075sage": {"prompt_tokens": 5}, "usage": {"prompt_tokens": 9}}'
    assert top_level_fields(escaped, (b"usage",)) is None
    as_value = json.dumps(_answer(note="usage")).encode()
    assert top_level_fields(as_value, (b"usage",)) is None
    assert top_level_fields(b"[1, 2]", (b"usage",)) is None
    assert top_level_fields(b'{"usage": {"prompt_tokens": 9', (b"usage",)) is None


def test_openai_usage_from_the_tail_matches_the_full_parse() -> None:
    dialect = OpenAIDialect()
    body = json.dumps(_answer(usage={**USAGE, "prompt_tokens_details": {"cached_tokens": 4}},
                              service_tier="flex")).encode()
    usage = dialect.usage_from_body("chat", body)
    assert usage is not None
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens, usage.service_tier) == \
        (5, 4, 12, "flex")
    assert dialect.usage_from_body("chat", json.dumps(_answer()).encode()) is None
