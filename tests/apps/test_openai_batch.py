"""OpenAI Batch files: input lines -> dataset rows (and per-line errors), output and error lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from apps.datasets import DataRejection, Row, read_dataset
from apps.openai_batch import (
    CHAT_URL,
    COMPLETIONS_URL,
    BatchLineError,
    batch_row,
    error_line,
    looks_like_batch,
    output_line,
)

CHAT: dict[str, Any] = {
    "custom_id": "q1", "method": "POST", "url": CHAT_URL,
    "body": {"model": "llama-8b", "max_tokens": 64, "temperature": 0.5, "top_p": 0.9,
             "messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "What is"},
                                                       {"type": "text", "text": "Redis?"}]}]},
}  # fmt: skip
COMPLETION: dict[str, Any] = {
    "custom_id": "c1", "method": "POST", "url": COMPLETIONS_URL,
    "body": {"model": "mistral-7b", "prompt": "Once upon a time", "max_completion_tokens": 32},
}  # fmt: skip


def _line(base: dict[str, Any], **body: Any) -> dict[str, Any]:
    """``base`` with ``body`` fields replaced (a value of ... removes the field)."""
    new = {**base["body"], **body}
    return {**base, "body": {k: v for k, v in new.items() if v is not ...}}


def read_batch(lines: list[str], path: Path) -> tuple[list[Row], list[DataRejection]]:
    """The lines as an OpenAI Batch dataset file read by the loader: rows and rejections."""
    path.write_text("\n".join(lines) + "\n")
    ds = read_dataset("b", path, None, "openai", "app.yaml")
    return list(ds.rows), list(ds.rejected)


def _shape_ok(line: dict[str, Any]) -> None:
    """The keys of an OpenAI Batch output line."""
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert line["id"].startswith("batch_req_") and isinstance(line["custom_id"], str)


# ------------------------------------------------------------------ round trip
def test_round_trip_input_rows_to_output_lines(tmp_path: Path) -> None:
    rows = [batch_row(x, f"batch.jsonl:{n}") for n, x in enumerate((CHAT, COMPLETION), 1)]
    loaded, errors = read_batch([json.dumps(CHAT), json.dumps(COMPLETION), ""],
                                tmp_path / "batch.jsonl")  # fmt: skip
    assert errors == [] and [r.id for r in loaded] == ["q1", "c1"]
    assert loaded[0].messages == (("system", "Be brief."), ("user", "What is\nRedis?"))
    assert (loaded[0].max_tokens, loaded[0].temperature, loaded[0].top_p) == (64, 0.5, 0.9)
    assert loaded[1].completion and loaded[1].messages is None and loaded[1].max_tokens == 32
    chat, comp = rows
    assert chat == {
        "id": "q1", "url": CHAT_URL, "prompt": "Be brief.\n\nWhat is\nRedis?",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is\nRedis?"}],
        "model": "llama-8b", "max_tokens": 64, "temperature": 0.5, "top_p": 0.9,
    }  # fmt: skip
    assert comp == {"id": "c1", "url": COMPLETIONS_URL, "prompt": "Once upon a time",
                    "model": "mistral-7b", "max_tokens": 32}  # fmt: skip

    outs = [
        output_line(custom_id=r["id"], model=r["model"], text=f"answer {r['id']}",
                    prompt_tokens=10 + i, output_tokens=5, finish_reason="stop",
                    chat=r["url"] == CHAT_URL, request_id=f"node/{r['id']}", created=1700000000)
        for i, r in enumerate(rows)
    ]  # fmt: skip
    for line, row in zip(outs, rows, strict=True):
        _shape_ok(line)
        assert line["custom_id"] == row["id"] and line["error"] is None
        resp = line["response"]
        assert resp["status_code"] == 200 and resp["request_id"] == f"node/{row['id']}"
        body = resp["body"]
        assert body["model"] == row["model"] and body["created"] == 1700000000
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert u["completion_tokens"] == 5
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    chat_body, comp_body = (o["response"]["body"] for o in outs)
    assert chat_body["object"] == "chat.completion" and chat_body["id"].startswith("chatcmpl-")
    assert chat_body["choices"][0]["message"] == {"role": "assistant", "content": "answer q1"}
    assert comp_body["object"] == "text_completion" and comp_body["id"].startswith("cmpl-")
    assert comp_body["choices"][0]["text"] == "answer c1"
    assert "message" not in comp_body["choices"][0]
    assert json.loads(json.dumps(outs)) == outs  # plain JSON


def test_output_ids_are_deterministic() -> None:
    args: dict[str, Any] = dict(custom_id="a", model="m", text="t", prompt_tokens=1,
                                output_tokens=2, finish_reason="length", chat=True,
                                request_id="n/a", created=5)  # fmt: skip
    assert output_line(**args) == output_line(**args)
    assert output_line(**args)["id"] != output_line(**{**args, "text": "u"})["id"]
    assert error_line(custom_id="a", message="x") == error_line(custom_id="a", message="x")


def test_error_line_shape() -> None:
    line = error_line(custom_id="q7", message="prompt too long", code="context_length")
    _shape_ok(line)
    assert line["custom_id"] == "q7" and line["response"] is None
    assert line["error"] == {"code": "context_length", "message": "prompt too long"}
    assert error_line(custom_id="q7", message="m")["error"]["code"] == "invalid_request"


def test_looks_like_batch() -> None:
    assert looks_like_batch(CHAT)
    assert not looks_like_batch({"id": "x", "prompt": "p"})
    assert not looks_like_batch([CHAT])


def test_optional_fields_and_null_values() -> None:
    body = {"prompt": "p", "temperature": None, "max_tokens": None}
    row = batch_row({"custom_id": "x", "url": COMPLETIONS_URL, "body": body}, "f:1")
    assert row == {"id": "x", "url": COMPLETIONS_URL, "prompt": "p"}  # method defaults to POST


# ------------------------------------------------------------------ bad lines
BAD: list[tuple[str, Any, str]] = [
    # (case, parsed line, expected message after "b.jsonl:<n>")
    ("not an object", ["x"], ": expected a JSON object, got list"),
    ("no custom_id", {"url": CHAT_URL, "body": {}}, ": custom_id: missing"),
    ("empty custom_id", {**CHAT, "custom_id": " "}, ": custom_id: empty"),
    ("int custom_id", {**CHAT, "custom_id": 7}, ": custom_id: expected a string, got int"),
    ("bad url", {**CHAT, "url": "/v1/embeddings"}, " (custom_id 'q1'): url: unsupported"),
    ("no url", {k: v for k, v in CHAT.items() if k != "url"}, " (custom_id 'q1'): url: missing"),
    ("GET", {**CHAT, "method": "GET"}, " (custom_id 'q1'): method: expected 'POST'"),
    ("body list", {**CHAT, "body": []}, " (custom_id 'q1'): body: expected an object, got list"),
    ("no body", {k: v for k, v in CHAT.items() if k != "body"}, " (custom_id 'q1'): body: missing"),
    ("no text", _line(CHAT, messages=...), " (custom_id 'q1'): body: needs messages"),
    ("prompt on chat", _line(CHAT, messages=..., prompt="p"),
     " (custom_id 'q1'): body.messages: missing (body.prompt is for url /v1/completions)"),
    ("messages on completions", _line(COMPLETION, prompt=..., messages=[]),
     " (custom_id 'c1'): body.prompt: missing (body.messages is for url /v1/chat/completions)"),
    ("prompt list", _line(COMPLETION, prompt=["a", "b"]),
     " (custom_id 'c1'): body.prompt: a list (several prompts or token ids) is not supported"),
    ("token ids", _line(COMPLETION, prompt=[1, 2, 3]), " (custom_id 'c1'): body.prompt: a list"),
    ("prompt int", _line(COMPLETION, prompt=5),
     " (custom_id 'c1'): body.prompt: expected a string, got int"),
    ("empty messages", _line(CHAT, messages=[]), " (custom_id 'q1'): body.messages: expected"),
    ("message str", _line(CHAT, messages=["hi"]),
     " (custom_id 'q1'): body.messages[0]: expected an object"),
    ("bad role", _line(CHAT, messages=[{"role": "robot", "content": "x"}]),
     " (custom_id 'q1'): body.messages[0].role: expected one of"),
    ("content null", _line(CHAT, messages=[{"role": "user", "content": "a"},
                                           {"role": "assistant", "content": None}]),
     " (custom_id 'q1'): body.messages[1].content: expected text"),
    ("image part", _line(CHAT, messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}]}]),
     " (custom_id 'q1'): body.messages[0].content[1]: 'image_url' parts are not supported"),
    ("part text int", _line(CHAT, messages=[{"role": "user", "content": [{"type": "text",
                                                                           "text": 3}]}]),
     " (custom_id 'q1'): body.messages[0].content[0].text: expected a string"),
    ("max_tokens 0", _line(CHAT, max_tokens=0),
     " (custom_id 'q1'): body.max_tokens: expected an integer >= 1, got 0"),
    ("max_tokens float", _line(CHAT, max_tokens=1.5), " (custom_id 'q1'): body.max_tokens:"),
    ("max_tokens bool", _line(CHAT, max_tokens=True), " (custom_id 'q1'): body.max_tokens:"),
    ("alias 0", _line(COMPLETION, max_completion_tokens=0),
     " (custom_id 'c1'): body.max_completion_tokens: expected an integer >= 1"),
    ("both differ", _line(COMPLETION, max_tokens=8),
     " (custom_id 'c1'): body.max_completion_tokens: differs from body.max_tokens"),
    ("temperature str", _line(CHAT, temperature="hot"),
     " (custom_id 'q1'): body.temperature: expected a number, got str"),
    ("temperature 3", _line(CHAT, temperature=3),
     " (custom_id 'q1'): body.temperature: 3 is outside [0, 2]"),
    ("top_p 0", _line(CHAT, top_p=0), " (custom_id 'q1'): body.top_p: 0 is outside (0, 1]"),
    ("top_p 1.5", _line(CHAT, top_p=1.5), " (custom_id 'q1'): body.top_p: 1.5 is outside"),
    ("model empty", _line(CHAT, model=""), " (custom_id 'q1'): body.model: expected a non-empty"),
    ("n 2", _line(CHAT, n=2), " (custom_id 'q1'): body.n: only n = 1 is supported"),
    ("stop", _line(CHAT, stop=["\n"]), " (custom_id 'q1'): body.stop: not supported by samullm"),
    ("stream", _line(CHAT, stream=True), " (custom_id 'q1'): body.stream: a batch request"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "obj", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_line_is_reported_and_good_lines_survive(
    case: str, obj: Any, expected: str, tmp_path: Path
) -> None:
    good = [{**CHAT, "custom_id": "g1"}, {**COMPLETION, "custom_id": "g2"}]
    lines = [json.dumps(good[0]), json.dumps(obj), "", json.dumps(good[1])]
    path = tmp_path / "b.jsonl"
    rows, errors = read_batch(lines, path)
    assert [r.id for r in rows] == ["g1", "g2"]
    (err,) = errors
    assert err.reason.startswith(f"{path}:2" + expected), err.reason
    readable = obj.get("custom_id") if isinstance(obj, dict) else None
    want_id = readable if isinstance(readable, str) and readable.strip() else "line 2"
    assert err.request_id == want_id
    with pytest.raises(BatchLineError, match="^b.jsonl:2"):
        batch_row(obj, "b.jsonl:2")


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    rows, errors = read_batch([json.dumps(CHAT), '{"custom_id": "x", ', json.dumps(COMPLETION)],
                              path)  # fmt: skip
    assert [r.id for r in rows] == ["q1", "c1"]
    (err,) = errors
    assert err.request_id == "line 2"
    assert err.reason.startswith(f"{path}:2: invalid JSON: ")


def test_duplicate_custom_id_names_the_earlier_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(CHAT), "", json.dumps(COMPLETION), json.dumps(_line(CHAT, max_tokens=9))]
    rows, errors = read_batch(lines, path)
    assert [r.id for r in rows] == ["q1", "c1"]
    assert rows[0].max_tokens == 64  # the first line wins
    (err,) = errors
    assert err.request_id == "q1"
    assert err.reason == f"{path}:4 (custom_id 'q1'): custom_id: duplicate of {path}:1"
