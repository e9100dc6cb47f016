"""apps.builders: each builder's document loads with parse_app into the expected graph; mixed()
is the union of its parts; YAML round trip; bad arguments raise ValueError naming them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from apps import builders as b
from apps.app_spec import LoadedApp, load_app, parse_app
from apps.prompts import JUDGE_TEMPLATE, ROUTER_TEMPLATE, parse_template
from planning.cluster import Cluster, Node
from planning.graph import AppGraph, LlmCall
from planning.io.lengths import AuthorsPdfs
from planning.profile import ProfileSet

VICUNA = "lmsys/vicuna-13b-v1.5"
LLAMA7 = "NousResearch/Llama-2-7b-chat-hf"
MISTRAL = "mistralai/Mistral-7B-Instruct-v0.2"
PAIRS = Cluster((Node("n0", "A100-80GB", 4, ((0, 1), (2, 3))),))
RULE_MODULE = "builders_test_rule"  # written into tmp_path by the rule test
QUESTIONS: list[dict[str, Any]] = [
    {"id": f"q{i}", "prompt": f"Question {i}: " + "please explain " * (i + 1),
     "label": "code" if i % 3 == 0 else "chat"}
    for i in range(9)
]  # fmt: skip
DOCS: list[dict[str, Any]] = [
    {"id": f"d{i}", "prompt": " ".join(["The river rose slowly."] * (30 * (i + 1)))}
    for i in range(3)
]

Loader = Callable[[dict[str, Any]], LoadedApp]


@pytest.fixture
def load(tmp_path: Path, profiles: ProfileSet, pdfs: AuthorsPdfs) -> Loader:
    """parse_app of a document, relative paths taken from tmp_path."""

    def run(doc: dict[str, Any]) -> LoadedApp:
        return parse_app(doc, "app.yaml", tmp_path, cluster=PAIRS, profiles=profiles,
                         authors_pdfs=pdfs)  # fmt: skip

    return run


def _calls(graph: AppGraph) -> dict[str, LlmCall]:
    return {c.name: c for c in graph.calls}


def _shape(graph: AppGraph, rename: Callable[[str], str] = str) -> dict[str, Any]:
    """Per call (renamed): model, request ids, base prompts, caps and deps by call name."""
    out = {}
    for c in graph.calls:
        deps = {rename(graph.calls[d.call].name): d.src.tolist() for d in c.deps}
        out[rename(c.name)] = (c.model, c.request_ids, c.base_prompt_len.tolist(),
                               c.max_tokens.tolist(), deps)  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# ensemble
# --------------------------------------------------------------------------------------------


def test_ensemble_with_fuser(load: Loader) -> None:
    doc = b.ensemble([VICUNA, LLAMA7, MISTRAL], QUESTIONS, fuser=VICUNA, max_tokens=128,
                     fuse_max_tokens=300)  # fmt: skip
    app = load(doc)
    answers = ["answer_vicuna-13b-v1_5", "answer_llama-2-7b-chat-hf",
               "answer_mistral-7b-instruct-v0_2"]  # fmt: skip
    calls = _calls(app.graph)
    assert list(calls) == [*answers, "fuse"]
    assert [m["id"] for m in doc["models"]] == [VICUNA, LLAMA7, MISTRAL]
    ids = tuple(q["id"] for q in QUESTIONS)
    for name in answers:
        assert calls[name].request_ids == ids
        assert calls[name].deps == ()
        assert calls[name].max_tokens.tolist() == [128] * len(ids)
    fuse = calls["fuse"]
    assert fuse.model == VICUNA and fuse.request_ids == ids
    assert fuse.max_tokens.tolist() == [300] * len(ids)
    deps = {app.graph.calls[d.call].name: d.src.tolist() for d in fuse.deps}
    assert deps == {a: list(range(len(ids))) for a in answers}
    # the fuser's prompt holds the question: longer than the answer prompts by the template
    assert all(fuse.base_prompt_len > calls[answers[0]].base_prompt_len)
    assert app.sinks == frozenset({"fuse"})


def test_ensemble_ranker_string_prompts_and_repeated_model(load: Loader) -> None:
    doc = b.ensemble([VICUNA, {"id": VICUNA}, LLAMA7], ["one?", "two?"], ranker=LLAMA7)
    app = load(doc)
    calls = _calls(app.graph)
    assert list(calls) == ["answer_vicuna-13b-v1_5", "answer_vicuna-13b-v1_5_2",
                           "answer_llama-2-7b-chat-hf", "rank"]  # fmt: skip
    assert doc["models"] == [{"id": VICUNA}, {"id": LLAMA7}]
    assert doc["datasets"]["prompts"] == {
        "records": [{"id": "0", "prompt": "one?"}, {"id": "1", "prompt": "two?"}]
    }
    assert calls["rank"].request_ids == ("0", "1")
    assert calls["rank"].max_tokens.tolist() == [b.RANK_MAX_TOKENS] * 2
    assert len(calls["rank"].deps) == 3


def test_ensemble_template_and_dataset_path(load: Loader, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "q.csv").write_text("id,prompt_tokens\na,10\nb,20\n")
    doc = b.ensemble([VICUNA], "data/q.csv", template="Answer briefly: {prompt}")
    assert doc["datasets"]["prompts"] == {"path": "data/q.csv"}
    call = _calls(load(doc).graph)["answer_vicuna-13b-v1_5"]
    assert call.request_ids == ("a", "b")
    assert call.base_prompt_len.tolist()[1] - call.base_prompt_len.tolist()[0] == 10


# --------------------------------------------------------------------------------------------
# route
# --------------------------------------------------------------------------------------------


def _by_label() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"code": [], "chat": []}
    for q in QUESTIONS:
        out[q["label"]].append(q["id"])
    return out


def test_route_by_column(load: Loader) -> None:
    doc = b.route({"code": VICUNA, "chat": LLAMA7}, QUESTIONS, column="label")
    assert [n["name"] for n in doc["nodes"]] == ["answer"]
    assert "model" not in doc["nodes"][0]
    app = load(doc)
    calls = _calls(app.graph)
    assert list(calls) == ["answer.code", "answer.chat"]
    want = _by_label()
    assert {k: list(calls[f"answer.{k}"].request_ids) for k in want} == want
    assert calls["answer.code"].model == VICUNA and calls["answer.chat"].model == LLAMA7
    assert app.run_graph is app.graph or _shape(app.runs) == _shape(app.graph)


def test_route_by_rule(load: Loader, tmp_path: Path) -> None:
    (tmp_path / f"{RULE_MODULE}.py").write_text(
        "def pick(row):\n    return 'code' if row['id'] in ('q0', 'q1') else 'other'\n"
    )
    targets = {"code": VICUNA, "chat": LLAMA7}
    doc = b.route(targets, QUESTIONS, rule=f"{RULE_MODULE}:pick", default="chat")
    assert doc["nodes"][0]["route"]["default"] == "chat"
    calls = _calls(load(doc).graph)
    assert calls["answer.code"].request_ids == ("q0", "q1")
    assert len(calls["answer.chat"].request_ids) == len(QUESTIONS) - 2


def test_route_targets_as_a_list_are_labelled_by_model() -> None:
    doc = b.route([VICUNA, LLAMA7, VICUNA], QUESTIONS, column="label")
    assert doc["nodes"][0]["route"]["targets"] == {
        "vicuna-13b-v1_5": VICUNA, "llama-2-7b-chat-hf": LLAMA7, "vicuna-13b-v1_5_2": VICUNA,
    }  # fmt: skip
    assert doc["models"] == [{"id": VICUNA}, {"id": LLAMA7}]


def test_route_by_router(load: Loader) -> None:
    doc = b.route({"code": VICUNA, "chat": LLAMA7}, QUESTIONS, router=MISTRAL,
                  estimate={"code": 1, "chat": 2}, default="chat")  # fmt: skip
    router = doc["nodes"][0]
    assert router["name"] == "router" and router["model"] == MISTRAL
    assert parse_template(router["input"]["template"]).fields == ("prompt",)
    assert "Models: code, chat" in router["input"]["template"]
    app = load(doc)
    ids = tuple(q["id"] for q in QUESTIONS)
    runs, plan = _calls(app.runs), _calls(app.graph)
    assert list(runs) == ["router", "answer.code", "answer.chat"]
    for label in ("code", "chat"):  # every row is a candidate under every label
        call = runs[f"answer.{label}"]
        assert call.request_ids == ids
        assert [(runs_name(app.runs, d.call), d.src.tolist()) for d in call.deps] == [
            ("router", list(range(len(ids))))
        ]
    # the planner sees each row once, split 1:2 by the estimate
    assert len(plan["answer.code"].request_ids) == 3
    assert len(plan["answer.chat"].request_ids) == 6
    assert set(plan["answer.code"].request_ids) | set(plan["answer.chat"].request_ids) == set(ids)
    assert plan["router"].max_tokens.tolist() == [b.ROUTER_MAX_TOKENS] * len(ids)


def runs_name(graph: AppGraph, index: int) -> str:
    return str(graph.calls[index].name)


def test_router_template_escapes_braces() -> None:
    text = b.fill_placeholder("{{x}} {labels} {prompt}", "labels", "a{b}")
    assert text == "{{x}} a{{b}} {prompt}"
    assert parse_template(text).fields == ("prompt",)
    assert b.router_template(["x", "y"]) == ROUTER_TEMPLATE.replace("{labels}", "x, y")


# --------------------------------------------------------------------------------------------
# chain_summary
# --------------------------------------------------------------------------------------------


def test_chain_summary_with_judges(load: Loader) -> None:
    doc = b.chain_summary(VICUNA, DOCS, chunk_tokens=200, judge=LLAMA7, judges=3)
    app = load(doc)
    calls = _calls(app.graph)
    chunks = [n for n in calls if n.startswith("summary.")]
    assert chunks == [f"summary.{k}" for k in range(len(chunks))] and len(chunks) > 2
    assert calls["summary.0"].request_ids == ("d0", "d1", "d2")
    for k in range(1, len(chunks)):  # each chunk call depends on the previous one, same doc
        prev, call = calls[f"summary.{k - 1}"], calls[f"summary.{k}"]
        (dep,) = call.deps
        assert runs_name(app.graph, dep.call) == f"summary.{k - 1}"
        assert [prev.request_ids[i] for i in dep.src] == list(call.request_ids)
    judge = calls["judge"]
    assert judge.request_ids == tuple(f"d{i}#{j}" for i in range(3) for j in range(3))
    assert judge.max_tokens.tolist() == [900] * 9
    assert doc["nodes"][1]["input"] == {"nodes": ["summary"], "repeat": 3,
                                        "template": JUDGE_TEMPLATE}  # fmt: skip
    last: dict[str, tuple[str, int]] = {}  # document -> (its last chunk call, its index there)
    for name in chunks:
        last |= {rid: (name, i) for i, rid in enumerate(calls[name].request_ids)}
    for n, rid in enumerate(judge.request_ids):
        got = [(runs_name(app.graph, d.call), int(d.src[n])) for d in judge.deps if d.src[n] >= 0]
        assert got == [last[rid.split("#")[0]]]


def test_chain_summary_without_judge(load: Loader) -> None:
    doc = b.chain_summary({"id": VICUNA, "tp": [1]}, DOCS[:1], chunk_tokens=4096)
    assert [c.name for c in load(doc).graph.calls] == ["summary.0"]


# --------------------------------------------------------------------------------------------
# openai_batch
# --------------------------------------------------------------------------------------------


def _batch_line(cid: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": f"Hi {cid}"}]}
    return json.dumps({"custom_id": cid, "url": "/v1/chat/completions", "body": body})


def test_openai_batch_routes_by_body_model(load: Loader, tmp_path: Path) -> None:
    lines = [_batch_line(f"r{i}", "small" if i % 2 else "tiny") for i in range(6)]
    (tmp_path / "batch.jsonl").write_text("\n".join([*lines, "{not json"]) + "\n")
    app = load(b.openai_batch("batch.jsonl", {"small": VICUNA, "tiny": LLAMA7}))
    calls = _calls(app.graph)
    assert calls["answer.small"].request_ids == ("r1", "r3", "r5")
    assert calls["answer.tiny"].request_ids == ("r0", "r2", "r4")
    assert [r.request_id for r in app.rejected] == ["line 7"]


def test_openai_batch_single_model(load: Loader, tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(_batch_line("x", "anything") + "\n")
    doc = b.openai_batch(tmp_path / "b.jsonl", {"any": VICUNA})
    assert doc["nodes"] == [{"name": "answer", "model": VICUNA, "input": {"dataset": "batch"}}]
    assert _calls(load(doc).graph)["answer"].request_ids == ("x",)


# --------------------------------------------------------------------------------------------
# mixed
# --------------------------------------------------------------------------------------------


def _parts() -> list[dict[str, Any]]:
    return [
        b.ensemble([VICUNA, LLAMA7], QUESTIONS, fuser=MISTRAL, max_tokens=100, name="ens"),
        b.route(
            {"code": VICUNA, "chat": LLAMA7},
            QUESTIONS,
            router=MISTRAL,
            estimate={"code": 1, "chat": 1},
            max_tokens=200,
            name="rt",
        ),  # fmt: skip
        b.chain_summary(VICUNA, DOCS, chunk_tokens=150, judge=LLAMA7, judges=2, name="cs"),
    ]


def _prefixed(prefix: str) -> Callable[[str], str]:
    return lambda name: f"{prefix}_{name}"


def test_mixed_is_the_union_of_its_parts(load: Loader) -> None:
    parts = _parts()
    doc = b.mixed(*parts)
    assert doc["models"] == [{"id": VICUNA}, {"id": LLAMA7}, {"id": MISTRAL}]
    assert set(doc["datasets"]) == {"ens_prompts", "rt_prompts", "cs_documents"}
    app = load(doc)
    want_runs: dict[str, Any] = {}
    want_counts: dict[str, int] = {}
    for part in parts:
        alone = load(part)
        prefix = part["name"]
        want_runs |= _shape(alone.runs, _prefixed(prefix))
        want_counts |= {f"{prefix}_{c.name}": len(c.request_ids) for c in alone.graph.calls}
    assert _shape(app.runs) == want_runs
    assert {c.name: len(c.request_ids) for c in app.graph.calls} == want_counts
    # each part keeps its own max_tokens
    assert app.sampling["ens_answer_vicuna-13b-v1_5"].max_tokens == 100
    assert app.sampling["rt_answer.code"].max_tokens == 200
    assert app.sampling["rt_router"].max_tokens == b.ROUTER_MAX_TOKENS
    assert app.sampling["cs_summary.0"].max_tokens == 900
    assert app.prompts["cs_judge"].template is not None
    assert app.prompts["cs_judge"].template.fields == ("cs_summary",)
    assert "{summary}" in app.prompts["cs_summary.1"].template.text  # type: ignore[union-attr]


def test_mixed_same_part_twice_and_conflicting_models(load: Loader) -> None:
    part = b.ensemble([VICUNA], ["q"], name="e")
    doc = b.mixed(part, part)
    assert [n["name"] for n in doc["nodes"]] == ["e_answer_vicuna-13b-v1_5",
                                                  "e_2_answer_vicuna-13b-v1_5"]  # fmt: skip
    load(doc)
    other = b.ensemble([{"id": VICUNA, "tp": [2]}], ["q"])
    with pytest.raises(ValueError, match=r"^apps: model 'lmsys/vicuna-13b-v1.5'"):
        b.mixed(part, other)
    same = b.ensemble([{"id": VICUNA, "profile": "auto"}], ["q"])
    assert b.mixed(part, same)["models"] == [{"id": VICUNA}]


# --------------------------------------------------------------------------------------------
# YAML round trip
# --------------------------------------------------------------------------------------------


def test_yaml_round_trip(tmp_path: Path, load: Loader, profiles: ProfileSet,
                         pdfs: AuthorsPdfs) -> None:  # fmt: skip
    doc = b.mixed(*_parts())
    path = b.write(doc, tmp_path / "sub" / "mixed.yaml")
    assert path.is_file()
    assert yaml.safe_load(path.read_text()) == doc
    from_file = load_app(path, cluster=PAIRS, profiles=profiles, authors_pdfs=pdfs)
    assert _shape(from_file.graph) == _shape(load(doc).graph)
    assert _shape(from_file.runs) == _shape(load(doc).runs)


# --------------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (lambda: b.ensemble([], ["q"]), "models"),
        (lambda: b.ensemble(VICUNA, ["q"]), "models"),
        (lambda: b.ensemble([VICUNA, 3], ["q"]), r"models\[1\]"),  # type: ignore[list-item]
        (lambda: b.ensemble([{"tp": [1]}], ["q"]), r"models\[0\]"),
        (lambda: b.ensemble([VICUNA], []), "prompts"),
        (lambda: b.ensemble([VICUNA], [1]), r"prompts\[0\]"),  # type: ignore[list-item]
        (lambda: b.ensemble([VICUNA], ["q"], max_tokens=0), "max_tokens"),
        (lambda: b.ensemble([VICUNA], ["q"], fuse_max_tokens=9), "fuse_max_tokens"),
        (lambda: b.ensemble([VICUNA], ["q"], template="{oops"), "template"),
        (lambda: b.ensemble([VICUNA], ["q"], name="a b"), "name"),
        (lambda: b.route({"a": VICUNA}, ["q"]), "column/rule/router"),
        (lambda: b.route({"a": VICUNA}, ["q"], column="c", rule="m:f"), "column/rule/router"),
        (lambda: b.route({"a.b": VICUNA}, ["q"], column="c"), "targets"),
        (lambda: b.route({}, ["q"], column="c"), "targets"),
        (lambda: b.route({"a": VICUNA}, ["q"], rule="nocolon"), "rule"),
        (lambda: b.route({"a": VICUNA}, ["q"], column="c", estimate={"a": 1}), "estimate"),
        (lambda: b.route({"a": VICUNA}, ["q"], router=LLAMA7, estimate={"z": 1}), "estimate"),
        (lambda: b.route({"a": VICUNA}, ["q"], column="c", default="z"), "default"),
        (lambda: b.chain_summary(VICUNA, DOCS, judges=0, judge=LLAMA7), "judges"),
        (lambda: b.chain_summary(VICUNA, DOCS, judges=2), "judges"),
        (lambda: b.chain_summary(VICUNA, DOCS, chunk_tokens=0), "chunk_tokens"),
        (lambda: b.chain_summary(None, DOCS), "summarizer"),  # type: ignore[arg-type]
        (lambda: b.openai_batch("b.jsonl", {"org/model": VICUNA, "x": LLAMA7}), "models"),
        (lambda: b.openai_batch("", {"x": VICUNA}), "path"),
        (lambda: b.openai_batch("b.jsonl", {"x": VICUNA}, default="y"), "default"),
        (lambda: b.mixed(), "apps"),
        (lambda: b.mixed({"name": "x"}), r"apps\[0\]\.models"),
    ],
)
def test_bad_arguments_name_the_argument(call: Callable[[], object], arg: str) -> None:
    with pytest.raises(ValueError, match=rf"^{arg}"):
        call()


def test_a_submitted_rule_route_needs_no_module_on_the_coordinator(
    load: Loader, tmp_path: Path
) -> None:
    """self_contained applies the rule where the file is; the document carries its labels (and
    a row the rule raised on stays an error of that row)."""
    import sys

    from apps.app_spec import self_contained

    mod = "rule_for_submission"
    (tmp_path / f"{mod}.py").write_text(
        "def pick(row):\n    if row['id'] == 'q2':\n        raise KeyError('boom')\n"
        "    return 'code' if row['id'] in ('q0', 'q1') else 'chat'\n"
    )
    doc = b.route({"code": VICUNA, "chat": LLAMA7}, QUESTIONS, rule=f"{mod}:pick")
    path = b.write(doc, tmp_path / "app.yaml")
    sub = self_contained(path)
    labels = sub["nodes"][0]["route"]["labels"]
    assert labels["q0"] == "code" and labels["q3"] == "chat"
    assert labels["q2"].startswith("!KeyError")
    (tmp_path / f"{mod}.py").unlink()
    sys.modules.pop(mod, None)
    app = load(sub)  # the module is gone: only the labels route
    calls = _calls(app.graph)
    assert calls["answer.code"].request_ids == ("q0", "q1")
    assert "q2" not in calls["answer.chat"].request_ids
    assert [r.request_id for r in app.rejected] == ["q2"]
    assert "route rule rule_for_submission:pick raised KeyError" in app.rejected[0].reason
