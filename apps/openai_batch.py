"""OpenAI Batch files: read request lines into dataset rows, write response and error lines.

The input format is the OpenAI Batch API's (also what ``vllm run-batch`` reads): one JSON object
per line, ``{"custom_id", "method": "POST", "url", "body"}``, where ``url`` is
``/v1/chat/completions`` (``body.messages``) or ``/v1/completions`` (``body.prompt``, one
string). :func:`batch_row` turns one parsed line into a dataset row (``id`` = ``custom_id``,
``prompt`` = the text, plus ``url``, ``model``, ``messages``, ``max_tokens``, ``temperature``,
``top_p`` when given) or raises :class:`BatchLineError`; :mod:`apps.datasets` reads a file with
it, one rejection per bad line (invalid JSON and duplicate custom_ids included), the rest going on.

Only text is supported: message content is a string or a list of ``{"type": "text"}`` parts
(joined with a newline); a chat row's ``prompt`` is its message contents joined with a blank line.
``method`` may be left out (it can only be ``POST``); ``body.n`` must be 1 when given.

:func:`output_line` and :func:`error_line` build the lines of an OpenAI Batch output file:
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``, where
``body`` is a ``chat.completion`` or ``text_completion`` object. Ids are hashes of the arguments
(``created``, the export time, included), so one export's ids are distinct and reproducible from
its arguments.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NoReturn

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)
ROLES = ("system", "developer", "user", "assistant", "tool")
_PARTS_SEP = "\n"  # between the text parts of one message
_MESSAGES_SEP = "\n\n"  # between messages in a chat row's "prompt"


class BatchLineError(ValueError):
    """A bad batch line; the message starts with ``file:line`` (and the custom_id when read)."""


# --------------------------------------------------------------------------------------------
# Input lines.
# --------------------------------------------------------------------------------------------


def looks_like_batch(obj: object) -> bool:
    """Whether a parsed line is a batch request (a dict with ``custom_id`` and ``body``)."""
    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj


def _fail(label: str, field: str, what: str) -> NoReturn:
    raise BatchLineError(f"{label}: {field}: {what}" if field else f"{label}: {what}")


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _custom_id(obj: dict[str, Any], label: str) -> str:
    if "custom_id" not in obj:
        _fail(label, "custom_id", "missing")
    cid = obj["custom_id"]
    if not isinstance(cid, str):
        _fail(label, "custom_id", f"expected a string, got {_kind(cid)}")
    if not cid.strip():
        _fail(label, "custom_id", "empty")
    return cid


def _url(obj: dict[str, Any], label: str) -> str:
    method = obj.get("method", "POST")
    if method != "POST":
        _fail(label, "method", f"expected 'POST', got {method!r}")
    if "url" not in obj:
        _fail(label, "url", f"missing (one of {', '.join(URLS)})")
    url = obj["url"]
    if url not in URLS:
        _fail(label, "url", f"unsupported {url!r} (one of {', '.join(URLS)})")
    return str(url)


def batch_row(obj: object, label: str) -> dict[str, Any]:
    """Validate one parsed batch line; its dataset row.

    Raises:
        BatchLineError: the line is not a valid request (names the line, custom_id and field).
    """
    if not isinstance(obj, dict):
        _fail(label, "", f"expected a JSON object, got {_kind(obj)}")
    cid = _custom_id(obj, label)
    label = f"{label} (custom_id {cid!r})"
    url = _url(obj, label)
    body = obj["body"] if "body" in obj else _fail(label, "body", "missing")
    if not isinstance(body, dict):
        _fail(label, "body", f"expected an object, got {_kind(body)}")
    row: dict[str, Any] = {"id": cid, "url": url}
    if url == CHAT_URL:
        messages = _messages(body, label)
        row["prompt"] = _MESSAGES_SEP.join(m["content"] for m in messages)
        row["messages"] = messages
    else:
        row["prompt"] = _prompt(body, label)
    row.update(_options(body, label))
    return row


def _missing_text(body: dict[str, Any], want: str, label: str) -> NoReturn:
    other = {"messages": ("prompt", COMPLETIONS_URL), "prompt": ("messages", CHAT_URL)}[want]
    if other[0] in body:
        _fail(label, f"body.{want}", f"missing (body.{other[0]} is for url {other[1]})")
    _fail(label, "body", "needs messages (url /v1/chat/completions) or prompt (/v1/completions)")


def _prompt(body: dict[str, Any], label: str) -> str:
    if "prompt" not in body:
        _missing_text(body, "prompt", label)
    prompt = body["prompt"]
    if isinstance(prompt, list):
        _fail(label, "body.prompt", "a list (several prompts or token ids) is not supported: "
              "give one string per line")  # fmt: skip
    if not isinstance(prompt, str):
        _fail(label, "body.prompt", f"expected a string, got {_kind(prompt)}")
    return prompt


def _messages(body: dict[str, Any], label: str) -> list[dict[str, str]]:
    if "messages" not in body:
        _missing_text(body, "messages", label)
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        _fail(label, "body.messages", "expected a non-empty list of messages")
    return [_message(m, f"body.messages[{i}]", label) for i, m in enumerate(messages)]


def _message(msg: object, at: str, label: str) -> dict[str, str]:
    if not isinstance(msg, dict):
        _fail(label, at, f"expected an object with role and content, got {_kind(msg)}")
    role = msg.get("role")
    if role not in ROLES:
        _fail(label, f"{at}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
    return {"role": str(role), "content": _content(msg.get("content"), f"{at}.content", label)}


def _content(content: object, at: str, label: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        _fail(label, at, f"expected text (a string or text parts), got {_kind(content)}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"{kind!r} parts are not supported" if kind else "expected a text part"
            _fail(label, f"{at}[{j}]", f"{what} (only {{'type': 'text', 'text': ...}})")
        text = part.get("text")
        if not isinstance(text, str):
            _fail(label, f"{at}[{j}].text", f"expected a string, got {_kind(text)}")
        texts.append(text)
    return _PARTS_SEP.join(texts)


# body fields read, or that change nothing in the answer
_KNOWN_BODY = frozenset({
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "n", "stream", "user", "metadata", "store",
})  # fmt: skip


def _options(body: dict[str, Any], label: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str) or not model.strip():
            _fail(label, "body.model", f"expected a non-empty string, got {model!r}")
        out["model"] = model
    max_tokens = _max_tokens(body, label)
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    for key, low, high, low_open in (("temperature", 0.0, 2.0, False), ("top_p", 0.0, 1.0, True)):
        value = body.get(key)
        if value is not None:
            out[key] = _number(value, f"body.{key}", (low, high, low_open), label)
    n = body.get("n")
    if n is not None and n != 1:
        _fail(label, "body.n", f"only n = 1 is supported, got {n!r}")
    if body.get("stream"):
        _fail(label, "body.stream", "a batch request cannot stream; leave it out or false")
    for key in sorted(set(body) - _KNOWN_BODY):
        if body[key] is not None:  # it would change the answer
            _fail(label, f"body.{key}", "not supported by samullm (the request would run "
                  "without it); remove it")  # fmt: skip
    return out


def _max_tokens(body: dict[str, Any], label: str) -> int | None:
    given = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(label, f"body.{key}", f"expected an integer >= 1, got {value!r}")
    if len(set(given.values())) > 1:
        _fail(label, "body.max_completion_tokens", "differs from body.max_tokens (give one)")
    return next(iter(given.values()), None)


def _number(value: object, at: str, bounds: tuple[float, float, bool], label: str) -> float:
    low, high, low_open = bounds
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(label, at, f"expected a number, got {_kind(value)}")
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        _fail(label, at, f"{value!r} is outside {interval}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Output lines.
# --------------------------------------------------------------------------------------------


def _digest(*parts: object) -> str:
    text = json.dumps(parts, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def output_line(
    *,
    custom_id: str,
    model: str,
    text: str,
    prompt_tokens: int,
    output_tokens: int,
    finish_reason: str,
    chat: bool,
    request_id: str,
    created: int,
) -> dict[str, Any]:
    """A successful OpenAI Batch output line (``created`` in unix s; ids hash the arguments)."""
    key = _digest(custom_id, model, text, prompt_tokens, output_tokens, finish_reason, chat,
                  request_id, created)  # fmt: skip
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice.update(logprobs=None, finish_reason=finish_reason)
    body = {
        "id": f"chatcmpl-{key}" if chat else f"cmpl-{key}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens,
                  "total_tokens": prompt_tokens + output_tokens},
    }  # fmt: skip
    response = {"status_code": 200, "request_id": request_id, "body": body}
    return {"id": f"batch_req_{key}", "custom_id": custom_id, "response": response, "error": None}


def error_line(*, custom_id: str, message: str, code: str = "invalid_request") -> dict[str, Any]:
    """A failed request's OpenAI Batch output line (no response, an error object)."""
    return {
        "id": f"batch_req_{_digest(custom_id, message, code)}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
