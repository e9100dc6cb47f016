"""Prompt building per request (apps/requests.py) and what expansion makes of templates, chain
text, routes and per-row settings (apps/expand.py), including per-record errors vs refusals."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from apps.app_spec import LoadedApp, parse_app
from apps.chunking import split_chunks
from apps.cluster_spec import SpecError
from apps.expand import estimate_split
from apps.prompts import parse_template
from apps.requests import CallPrompt, RequestText, RouteInfo, node_of, render
from apps.tokens import estimate_tokens
from planning.cluster import Cluster, Node
from planning.io.lengths import AuthorsPdfs
from planning.profile import ProfileSet

VICUNA = "lmsys/vicuna-13b-v1.5"
LLAMA7 = "NousResearch/Llama-2-7b-chat-hf"
PAIRS = Cluster((Node("n0", "A100-80GB", 4, ((0, 1), (2, 3))),))
Loader = Callable[[dict[str, Any]], LoadedApp]


@pytest.fixture
def load(tmp_path: Path, profiles: ProfileSet, pdfs: AuthorsPdfs) -> Loader:
    def run(doc: dict[str, Any]) -> LoadedApp:
        return parse_app(copy.deepcopy(doc), "app.yaml", tmp_path, cluster=PAIRS,
                         profiles=profiles, authors_pdfs=pdfs)  # fmt: skip

    return run


# ------------------------------------------------------------------ render


def _cp(template: str | None, **kw: Any) -> CallPrompt:
    fields = {"id": "q1", "prompt": "What is 2+2?", "topic": "maths"}
    tmpl = parse_template(template) if template is not None else None
    return CallPrompt(tmpl, (RequestText(fields),), **kw)


def test_render_fills_columns_inputs_and_named_nodes() -> None:
    ups = [("answer_a", "Four."), ("answer_b", "4")]
    cp = _cp("[{topic}] {prompt}\nA: {answer_a}\nB: {answer_b}\nAll:\n{inputs}")
    assert render(cp, 0, ups) == (
        "[maths] What is 2+2?\nA: Four.\nB: 4\nAll:\n[1] answer_a\nFour.\n\n[2] answer_b\n4"
    )


def test_render_without_template_and_with_an_instruction_only_template() -> None:
    ups = [("answer_a", "Four.")]
    assert render(_cp(None), 0, ups) == "What is 2+2?\n\nFour."
    assert render(_cp("Be brief."), 0, ups) == "Be brief.\n\nWhat is 2+2?\n\nFour."
    assert render(_cp(None), 0, []) == "What is 2+2?"


def test_render_chain_summary_so_far_and_missing_inputs() -> None:
    req = RequestText({"id": "d", "prompt": "whole doc", "chunk": "part two"})
    nxt = CallPrompt(parse_template("So far: {summary}\nNext: {chunk}"), (req,), True)
    assert render(nxt, 0, [("s", "part one, summed")]) == "So far: part one, summed\nNext: part two"
    assert render(nxt, 0, []) == "So far: \nNext: part two"  # the first chunk: no summary yet
    plain = CallPrompt(None, (req,), True)
    assert render(plain, 0, [("s", "sum")]) == "sum\n\npart two"  # summary first, then chunk
    # an input that never came (a route's other candidate) renders empty, not as an error
    assert render(_cp("{prompt} / {answer_x}"), 0, []) == "What is 2+2? / "


def test_route_info_choose_and_node_of() -> None:
    info = RouteInfo("router", "big", ("big", "small"), default=None)
    assert info.choose("I pick SMALL, not big") == "small"
    assert info.choose("no idea") is None
    assert RouteInfo("router", "big", ("big", "small"), default="big").choose("?") == "big"
    assert [node_of(c) for c in ("summary.3", "answer.big", "judge")] == [
        "summary", "answer", "judge"
    ]  # fmt: skip


# ------------------------------------------------------------------ expansion


def _doc(nodes: list[dict[str, Any]], rows: list[Any] | None = None) -> dict[str, Any]:
    rows = rows or [{"id": f"q{i}", "prompt": f"Question number {i}?", "size": "big" if i % 2
                     else "small"} for i in range(4)]  # fmt: skip
    return {
        "defaults": {"sampling": {"max_tokens": 64}},
        "models": [{"id": VICUNA}, {"id": LLAMA7}],
        "datasets": {"q": {"records": rows}},
        "nodes": nodes,
    }


def _calls(app: LoadedApp) -> dict[str, Any]:
    return {c.name: c for c in app.runs.calls}


def test_template_tokens_count_the_fixed_text_and_the_named_columns(load: Loader) -> None:
    tmpl = "Topic {size}. Question: {prompt} Answer briefly."
    inp = {"dataset": "q", "template": tmpl, "template_tokens": 3}
    app = load(_doc([{"name": "a", "model": VICUNA, "input": inp}]))
    fixed = estimate_tokens("Topic . Question:  Answer briefly.")
    want = [3 + fixed + estimate_tokens(f"Question number {i}?") + estimate_tokens(
        "big" if i % 2 else "small") for i in range(4)]  # fmt: skip
    assert _calls(app)["a"].base_prompt_len.tolist() == want
    assert app.prompts["a"].template is not None
    assert app.prompts["a"].requests[1].fields["size"] == "big"


def test_rows_override_max_tokens_and_sampling(load: Loader) -> None:
    rows = [{"id": "a", "prompt": "x", "max_tokens": 7}, {"id": "b", "prompt": "y"}]
    app = load(_doc([{"name": "n", "model": VICUNA, "input": {"dataset": "q"}}], rows))
    assert _calls(app)["n"].max_tokens.tolist() == [7, 64]


@pytest.mark.parametrize(
    ("node", "words"),
    [
        (
            {"name": "n", "model": VICUNA, "input": {"dataset": "q", "template": "{questoin}"}},
            "nodes[0].input.template: placeholder {questoin}: not a column",
        ),
        (
            {"name": "n", "model": VICUNA, "input": {"dataset": "q", "template": "{prompt"}},
            "nodes[0].input.template: ",
        ),
        (
            {
                "name": "n",
                "model": VICUNA,
                "chain": {"dataset": "q", "chunk_tokens": 8, "template": "{summary} only"},
            },
            "nodes[0].chain.template: a chain template needs the {chunk} placeholder",
        ),
        (
            {
                "name": "n",
                "route": {"dataset": "q", "rule": "no_such_mod_xyz:pick", "targets": {"a": VICUNA}},
            },
            "nodes[0].route.rule: cannot load no_such_mod_xyz:pick: ModuleNotFoundError",
        ),
        (
            {"name": "n", "route": {"dataset": "q", "router": "ghost", "targets": {"a": VICUNA}}},
            "nodes[0].route.router: unknown node 'ghost'",
        ),
        (
            {"name": "n", "route": {"dataset": "q", "column": "size", "targets": {"a": "nope/x"}}},
            "nodes[0].route.targets.a: unknown model 'nope/x'",
        ),
        (
            {
                "name": "n",
                "model": VICUNA,
                "route": {"dataset": "q", "column": "size", "targets": {"a": VICUNA}},
            },
            "a route node calls its targets' models; remove model",
        ),
        (
            {
                "name": "n",
                "route": {
                    "dataset": "q",
                    "column": "size",
                    "estimate": {"a": 1.0},
                    "targets": {"a": VICUNA},
                },
            },
            "estimate is for routes made by a router node",
        ),
    ],
)
def test_bad_nodes_are_refused_naming_the_field(load: Loader, node: Any, words: str) -> None:
    with pytest.raises(SpecError) as e:
        load(_doc([node]))
    assert str(e.value).startswith("app.yaml: ") and words in str(e.value), str(e.value)


def test_chain_of_text_documents_and_documents_that_cannot_be_chunked(load: Loader) -> None:
    text = " ".join(f"Sentence {k} of the document goes here." for k in range(40))
    rows = [{"id": "long", "prompt": text}, {"id": "short", "prompt": "Just a line."},
            {"id": "empty", "prompt": "   "}, {"id": "notext", "body": "x"}]  # fmt: skip
    nodes = [
        {"name": "s", "model": VICUNA, "chain": {
            "dataset": "q", "chunk_tokens": 64, "first_template": "Summarise: {chunk}",
            "template": "So far: {summary}\nNext: {chunk}"}},
        {"name": "judge", "model": LLAMA7, "input": {"nodes": ["s"], "repeat": 2}},
    ]  # fmt: skip
    app = load(_doc(nodes, rows))
    chunks = split_chunks(text, 64)
    calls = _calls(app)
    assert [n for n in calls if n.startswith("s.")] == [f"s.{k}" for k in range(len(chunks))]
    assert calls["s.0"].request_ids == ("long", "short")
    for k, c in enumerate(chunks):
        cp = app.prompts[f"s.{k}"]
        assert cp.requests[0].fields["chunk"] == c.text and cp.chain_prev
        fixed = estimate_tokens("Summarise: " if k == 0 else "So far: \nNext: ")
        assert int(calls[f"s.{k}"].base_prompt_len[0]) == c.tokens + fixed
    assert "".join(c.text for c in chunks) == text
    why = {r.request_id: r.reason for r in app.rejected if r.node == "s.0"}
    assert set(why) == {"empty", "notext"}
    assert "cannot be chunked" in why["empty"] and "no column 'prompt'" in why["notext"]
    judge = calls["judge"]
    assert judge.request_ids == ("long#0", "long#1", "short#0", "short#1")
    srcs = {app.runs.calls[d.call].name for d in judge.deps}
    assert srcs == {"s.0", f"s.{len(chunks) - 1}"}  # each document's last chunk


def test_route_by_column_rejects_unknown_labels_and_their_consumers(load: Loader) -> None:
    rows = [{"id": "a", "prompt": "x", "size": "big"}, {"id": "b", "prompt": "y", "size": "huge"},
            {"id": "c", "prompt": "z", "size": "small"}]  # fmt: skip
    nodes = [
        {"name": "ans", "route": {"dataset": "q", "column": "size",
                                  "targets": {"big": VICUNA, "small": LLAMA7}}},
        {"name": "fix", "model": LLAMA7, "input": {"dataset": "q", "nodes": ["ans"],
                                                    "template": "{prompt} -> {ans}"}},
    ]  # fmt: skip
    app = load(_doc(nodes, rows))
    calls = _calls(app)
    assert calls["ans.big"].request_ids == ("a",) and calls["ans.small"].request_ids == ("c",)
    assert calls["fix"].request_ids == ("a", "c")
    why = {(r.node, r.request_id): r.reason for r in app.rejected}
    assert "column 'size' holds 'huge', not a label of targets (big, small)" in why[("ans", "b")]
    assert "upstream request 'b'" in why[("fix", "b")]
    nodes[0]["route"]["default"] = "small"
    calls = _calls(load(_doc(nodes, rows)))
    assert calls["ans.small"].request_ids == ("b", "c") and len(calls["fix"].request_ids) == 3


def test_router_candidates_run_everywhere_but_plan_by_estimate(load: Loader) -> None:
    rows = [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(10)]
    nodes = [
        {"name": "r", "model": LLAMA7, "input": {"dataset": "q"}},
        {"name": "ans", "route": {"dataset": "q", "router": "r",
                                  "estimate": {"big": 0.8, "small": 0.2},
                                  "targets": {"big": VICUNA, "small": LLAMA7}}},
    ]  # fmt: skip
    app = load(_doc(nodes, rows))
    runs, plan = _calls(app), {c.name: c for c in app.graph.calls}
    assert len(runs["ans.big"].request_ids) == len(runs["ans.small"].request_ids) == 10
    assert (len(plan["ans.big"].request_ids), len(plan["ans.small"].request_ids)) == (8, 2)
    assert set(plan["ans.big"].request_ids).isdisjoint(plan["ans.small"].request_ids)
    info = app.prompts["ans.small"].route
    assert info is not None and (info.router, info.label, info.labels) == (
        "r",
        "small",
        ("big", "small"),
    )


def test_estimate_split_counts_and_minimum_one() -> None:
    ids = [f"x{i}" for i in range(7)]
    got = estimate_split(ids, ("a", "b", "c"), {"a": 0.98, "b": 0.01, "c": 0.01}, "n")
    counts = {lb: sum(1 for v in got.values() if v == lb) for lb in "abc"}
    assert counts == {"a": 5, "b": 1, "c": 1} and set(got) == set(ids)
    even = estimate_split(ids, ("a", "b"), None, "n")
    assert sorted(sum(1 for v in even.values() if v == lb) for lb in "ab") == [3, 4]
    assert estimate_split(ids, ("a", "b"), None, "n") == even  # seeded by the node name
