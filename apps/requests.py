"""What the runtime needs to build each request's prompt text, and the function that builds it.

The planner sees token counts only (:class:`planning.graph.LlmCall`). The coordinator, when a
request's inputs are committed, renders its prompt from the call's :class:`CallPrompt`: the
node's template filled with the row's columns (``{prompt}``, ``{instruction}``, ...), the chunk
of a chain call (``{chunk}``), and the outputs of the upstream requests it consumes, each under
its node's name (``{answer_a}``; a chain's previous summary also as ``{summary}``) and all of
them numbered as ``{inputs}``. A node without a template sends its own text followed by its
inputs; a template without any placeholder is an instruction put before that default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from apps.prompts import Template, default_prompt, numbered, route_choice

Messages = tuple[tuple[str, str], ...]  # chat messages as (role, content)


@dataclass(frozen=True, slots=True)
class RequestText:
    """The row-level inputs of one request."""

    fields: Mapping[str, str]  # the row's columns as text, plus "chunk" for a chain call
    messages: Messages | None = None  # chat messages (OpenAI Batch rows), sent as they are
    temperature: float | None = None  # the row's own sampling, over the node's
    top_p: float | None = None
    completion: bool = False  # an OpenAI Batch /v1/completions row


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """A candidate call of a route decided by a router node's output."""

    router: str  # the router node's name
    label: str  # this call's label
    labels: tuple[str, ...]  # every label of the route, in file order
    default: str | None = None  # label for an output naming none

    def choose(self, text: str) -> str | None:
        """The label the router's output names (or the default); None when neither."""
        return route_choice(text, self.labels) or self.default


@dataclass(frozen=True, slots=True)
class CallPrompt:
    """How the prompts of one call are built."""

    template: Template | None  # None: own text, then the inputs
    requests: tuple[RequestText, ...]  # per request of the call, in call order
    chain_prev: bool = False  # a chain call: the upstream output is the summary so far
    route: RouteInfo | None = None  # a router-decided candidate call


def node_of(call: str) -> str:
    """The node a call belongs to (``summary.3`` -> ``summary``, ``answer.big`` -> ``answer``)."""
    return call.split(".", 1)[0]


def render(cp: CallPrompt, r: int, upstream: Sequence[tuple[str, str]]) -> str:
    """The prompt text of request ``r``; ``upstream`` = (node name, output text) per input."""
    req = cp.requests[r]
    if cp.template is None or not cp.template.fields:
        own = req.fields.get("chunk", req.fields.get("prompt", ""))
        if cp.chain_prev:  # the summary so far first, then the next chunk
            body = default_prompt("", [*upstream, ("chunk", own)])
        else:
            body = default_prompt(own, upstream)
        if cp.template is None:
            return body
        return default_prompt(cp.template.fixed_text(), [("", body)])
    values: dict[str, str] = dict(req.fields)
    for node, text in upstream:
        values[node] = text
    if cp.chain_prev:
        values["summary"] = upstream[0][1] if upstream else ""
    values["inputs"] = numbered(upstream)
    return cp.template.render({f: values.get(f, "") for f in cp.template.fields})
