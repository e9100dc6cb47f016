"""Application files: graphs, chains, routing, rejections; every bad case names file and field."""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from apps.app_spec import LoadedApp, Rejection, Sampling, load_app, parse_app
from apps.cluster_spec import SpecError
from apps.tokens import estimate_tokens
from planning.cluster import Cluster, Node, candidate_exec_plans
from planning.estimate import ServingConfig
from planning.io.lengths import AuthorsPdfs, save_distribution
from planning.length_dist import LengthDistribution
from planning.profile import ProfileSet

VICUNA = "lmsys/vicuna-13b-v1.5"
LLAMA7 = "NousResearch/Llama-2-7b-chat-hf"
LLAMA70 = "meta-llama/Llama-2-70b-chat-hf"
PAIRS = Cluster((Node("n0", "A100-80GB", 8, ((0, 1), (2, 3), (4, 5), (6, 7))),))
DEFAULT_SERVING = ServingConfig()
SINGLES = Cluster((Node("n0", "A100-80GB", 8, tuple((i,) for i in range(8))),))


Loader = Callable[..., LoadedApp]


@pytest.fixture
def load(tmp_path: Path, profiles: ProfileSet, pdfs: AuthorsPdfs) -> Loader:
    """Write ``doc`` (and data ``files``) under tmp_path and load it."""

    def run(
        doc: dict[str, Any],
        files: dict[str, str] | None = None,
        *,
        name: str = "app.yaml",
        cluster: Cluster = PAIRS,
        serving: ServingConfig = DEFAULT_SERVING,
    ) -> LoadedApp:
        for rel, text in (files or {}).items():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text(text)
        f = tmp_path / name
        f.write_text(json.dumps(doc) if name.endswith(".json") else yaml.safe_dump(doc))
        return load_app(f, cluster=cluster, profiles=profiles, authors_pdfs=pdfs, serving=serving)

    return run


PROMPTS = "id,prompt_tokens,route\np0,100,chat\np1,200,code\np2,300,chat\np3,400,code\n"
DOCS = "id,prompt_tokens\nd1,1000\nd2,3000\nd3,5000\n"


def _ensemble() -> dict[str, Any]:
    return {
        "defaults": {"sampling": {"max_tokens": 512, "temperature": 0.7}},
        "models": [{"id": VICUNA}, {"id": LLAMA7}],
        "datasets": {"prompts": {"path": "data/prompts.csv"}},
        "nodes": [
            {"name": "vicuna", "model": VICUNA, "input": {"dataset": "prompts"}},
            {"name": "llama", "model": LLAMA7, "input": {"dataset": "prompts"},
             "sampling": {"max_tokens": 128, "top_p": 0.9}},
        ],
    }  # fmt: skip


def _calls(app: LoadedApp) -> dict[str, Any]:
    return {c.name: c for c in app.graph.calls}


def test_ensemble_loads(load: Loader) -> None:
    app = load(_ensemble(), {"data/prompts.csv": PROMPTS})
    calls = _calls(app)
    assert list(calls) == ["vicuna", "llama"]
    assert app.graph.name == "app"
    assert calls["vicuna"].request_ids == ("p0", "p1", "p2", "p3")
    assert calls["vicuna"].base_prompt_len.tolist() == [100, 200, 300, 400]
    assert calls["vicuna"].max_tokens.tolist() == [512] * 4
    assert calls["llama"].max_tokens.tolist() == [128] * 4
    assert app.sampling["llama"] == Sampling(128, temperature=0.7, top_p=0.9)
    assert app.sampling["vicuna"] == Sampling(512, temperature=0.7)
    assert set(app.graph.models) == {VICUNA, LLAMA7}
    assert sorted(app.graph.models[VICUNA].profiles) == [1, 2]  # pairs: tp <= 2
    assert app.notes[VICUNA] == "profile: measured tp1,tp2; lengths: authors pdf"
    assert app.rejected == ()


def test_effective_profiles_drive_candidate_plans(load: Loader) -> None:
    doc = _ensemble()
    doc["models"][0]["tp"] = [2]
    app = load(doc, {"data/prompts.csv": PROMPTS})
    plans = candidate_exec_plans(VICUNA, app.profiles, PAIRS, ServingConfig())
    assert {p.tp for p in plans} == {2}
    assert {p.tp for p in candidate_exec_plans(LLAMA7, app.profiles, PAIRS, ServingConfig())} == {
        1,
        2,
    }


def test_routing_with_where(load: Loader) -> None:
    doc = _ensemble()
    doc["nodes"][0]["input"]["where"] = {"route": "chat"}
    doc["nodes"][1]["input"]["where"] = {"route": "code"}
    calls = _calls(load(doc, {"data/prompts.csv": PROMPTS}))
    assert calls["vicuna"].request_ids == ("p0", "p2")
    assert calls["llama"].request_ids == ("p1", "p3")


def _chain() -> dict[str, Any]:
    return {
        "name": "summarise",
        "defaults": {"sampling": {"max_tokens": 256}},
        "models": [{"id": VICUNA}, {"id": LLAMA70}],
        "datasets": {"docs": {"path": "docs.csv"}},
        "nodes": [
            {"name": "judge", "model": LLAMA70,
             "input": {"nodes": ["summary"], "repeat": 2, "template_tokens": 120}},
            {"name": "summary", "model": VICUNA,
             "chain": {"dataset": "docs", "chunk_tokens": 2048, "template_tokens": 150}},
        ],
    }  # fmt: skip


def test_chain_expands_into_chunk_calls(load: Loader) -> None:
    app = load(_chain(), {"docs.csv": DOCS})
    calls = app.graph.calls
    assert [c.name for c in calls] == ["summary.0", "summary.1", "summary.2", "judge"]
    s0, s1, s2, judge = calls
    assert s0.request_ids == ("d1", "d2", "d3")
    assert s0.base_prompt_len.tolist() == [1000 + 150, 2048 + 150, 2048 + 150]
    assert s1.request_ids == ("d2", "d3")
    assert s1.base_prompt_len.tolist() == [3000 - 2048 + 150, 2048 + 150]
    assert s2.request_ids == ("d3",)
    assert s2.base_prompt_len.tolist() == [5000 - 4096 + 150]
    assert [(d.call, d.src.tolist()) for d in s1.deps] == [(0, [1, 2])]
    assert [(d.call, d.src.tolist()) for d in s2.deps] == [(1, [1])]
    assert judge.request_ids == ("d1#0", "d1#1", "d2#0", "d2#1", "d3#0", "d3#1")
    assert judge.base_prompt_len.tolist() == [120] * 6
    deps = {calls[d.call].name: d.src.tolist() for d in judge.deps}
    assert deps == {
        "summary.0": [0, 0, -1, -1, -1, -1],  # d1 has one chunk
        "summary.1": [-1, -1, 0, 0, -1, -1],  # d2 ends in chunk 1
        "summary.2": [-1, -1, -1, -1, 0, 0],  # d3 ends in chunk 2
    }
    assert set(app.sampling) == {"summary.0", "summary.1", "summary.2", "judge"}
    assert app.graph.name == "summarise"
    assert "analytic tp2" in app.notes[LLAMA70] and "skipped tp=1" in app.notes[LLAMA70]


def test_input_without_dataset_joins_by_id(load: Loader) -> None:
    doc = _ensemble()
    doc["nodes"][1]["input"]["where"] = {"route": "code"}
    merge_input = {"nodes": ["vicuna", "llama"], "template": "Pick the best."}
    doc["nodes"].append({"name": "merge", "model": VICUNA, "input": merge_input})
    app = load(doc, {"data/prompts.csv": PROMPTS})
    calls = app.graph.calls
    merge = _calls(app)["merge"]
    assert merge.request_ids == ("p0", "p1", "p2", "p3")  # the first listed node's ids
    assert merge.base_prompt_len.tolist() == [estimate_tokens("Pick the best.")] * 4
    deps = {calls[d.call].name: d.src.tolist() for d in merge.deps}
    assert deps == {"vicuna": [0, 1, 2, 3], "llama": [-1, 0, -1, 1]}  # missing ids: no dep


def test_over_long_prompt_is_rejected_with_its_downstream(load: Loader) -> None:
    doc = _ensemble()
    doc["nodes"].append(
        {"name": "judge", "model": LLAMA7, "input": {"dataset": "prompts", "nodes": ["vicuna"]}}
    )
    rows = PROMPTS + "long,4090,chat\nedge,4086,chat\nfits,4085,chat\n"
    doc["nodes"][0]["input"]["template_tokens"] = 10
    app = load(doc, {"data/prompts.csv": rows})
    by = {(r.node, r.request_id): r.reason for r in app.rejected}
    assert list(by) == [("vicuna", "long"), ("vicuna", "edge"), ("judge", "long"),
                        ("judge", "edge")]  # fmt: skip
    assert by[("vicuna", "long")] == (
        "prompt of 4100 tokens does not fit max_model_len 4096 of lmsys/vicuna-13b-v1.5 "
        "(at least 1 output token is needed)"
    )
    assert "prompt of 4096 tokens" in by[("vicuna", "edge")]
    assert by[("judge", "long")] == (
        "upstream request 'long' of node 'vicuna' was rejected: " + by[("vicuna", "long")]
    )
    calls = _calls(app)
    assert calls["vicuna"].request_ids == ("p0", "p1", "p2", "p3", "fits")
    assert calls["llama"].request_ids == ("p0", "p1", "p2", "p3", "long", "edge", "fits")
    assert calls["judge"].request_ids == ("p0", "p1", "p2", "p3", "fits")
    assert calls["judge"].deps[0].src.tolist() == [0, 1, 2, 3, 4]
    assert app.rejected[0] == Rejection("vicuna", "long", by[("vicuna", "long")])


def test_max_model_len_override_and_serving_limit(load: Loader) -> None:
    doc = _ensemble()
    doc["models"][0]["max_model_len"] = 250
    app = load(doc, {"data/prompts.csv": PROMPTS})
    assert app.graph.models[VICUNA].max_model_len == 250
    assert _calls(app)["vicuna"].request_ids == ("p0", "p1")
    assert "max_model_len: 250" in app.notes[VICUNA]
    app = load(_ensemble(), {"data/prompts.csv": PROMPTS}, serving=ServingConfig(max_model_len=350))
    assert _calls(app)["llama"].request_ids == ("p0", "p1", "p2")


def test_json_spec_and_text_prompts(load: Loader, tmp_path: Path) -> None:
    doc = _ensemble()
    doc["datasets"]["prompts"]["path"] = "p.jsonl.gz"
    texts = ["Hello there, how are you?", "x" * 400]
    with gzip.open(tmp_path / "p.jsonl.gz", "wt", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"prompt": t, "route": "chat"}) + "\n")
    app = load(doc, name="app.json")
    vic = _calls(app)["vicuna"]
    assert vic.request_ids == ("0", "1")  # no id column: row numbers
    assert vic.base_prompt_len.tolist() == [estimate_tokens(t) for t in texts]


def test_json_list_dataset(load: Loader) -> None:
    doc = _ensemble()
    doc["datasets"]["prompts"]["path"] = "p.json"
    rows = [{"id": 7, "prompt_tokens": 12}, {"id": "b", "prompt": "abcd" * 10, "prompt_tokens": 5}]
    app = load(doc, {"p.json": json.dumps(rows)})
    vic = _calls(app)["vicuna"]
    assert vic.request_ids == ("7", "b")
    assert vic.base_prompt_len.tolist() == [12, 5]  # prompt_tokens wins over prompt text


def test_twin_analytic_and_like_in_notes(load: Loader) -> None:
    doc = _ensemble()
    doc["models"][0].update(profile="twin:NousResearch/Llama-2-13b-hf", lengths="like:alpaca-13b")
    doc["models"][1]["profile"] = "analytic"
    app = load(doc, {"data/prompts.csv": PROMPTS})
    assert app.notes[VICUNA] == (
        "profile: twin:NousResearch/Llama-2-13b-hf tp1,tp2; lengths: like:alpaca-13b"
    )
    assert app.notes[LLAMA7] == "profile: analytic tp1,tp2; lengths: authors pdf"
    vic = app.graph.models[VICUNA]
    assert {p.source for p in vic.profiles.values()} == {"twin:NousResearch/Llama-2-13b-hf"}
    assert all(p.model == VICUNA for p in vic.profiles.values())
    assert {p.source for p in app.graph.models[LLAMA7].profiles.values()} == {"analytic"}


def test_config_file_and_distribution_file(load: Loader, tmp_path: Path) -> None:
    cfg = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 512,
           "num_attention_heads": 8, "intermediate_size": 1024, "vocab_size": 1000,
           "max_position_embeddings": 1024, "torch_dtype": "float16"}  # fmt: skip
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(cfg))
    save_distribution(tmp_path / "lens.json", LengthDistribution.from_pmf([0.5, 0.25, 0.25]))
    doc = _ensemble()
    doc["models"][0] = {"id": "acme/tiny", "config": "tiny/config.json", "lengths": "lens.json"}
    doc["models"].append({"id": "tiny", "lengths": "like:vicuna-13b-v1.5", "tp": [1]})
    doc["nodes"][0]["model"] = "acme/tiny"
    doc["nodes"].append({"name": "local", "model": "tiny", "input": {"dataset": "prompts"}})
    app = load(doc, {"data/prompts.csv": PROMPTS})
    assert app.notes["acme/tiny"] == "profile: analytic tp1,tp2; lengths: file lens.json"
    assert app.notes["tiny"] == "profile: analytic tp1; lengths: like:vicuna-13b-v1.5"
    assert app.graph.models["acme/tiny"].lengths.max_len == 3
    assert app.graph.models["acme/tiny"].max_model_len == 1024


def test_unused_model_is_left_out(load: Loader) -> None:
    doc = _ensemble()
    doc["models"].append({"id": LLAMA70})
    app = load(doc, {"data/prompts.csv": PROMPTS})
    assert set(app.graph.models) == {VICUNA, LLAMA7}


def test_model_that_fits_nowhere(load: Loader) -> None:
    doc = _ensemble()
    doc["models"].append({"id": LLAMA70})
    doc["nodes"].append({"name": "big", "model": LLAMA70, "input": {"dataset": "prompts"}})
    with pytest.raises(SpecError) as e:
        load(doc, {"data/prompts.csv": PROMPTS}, cluster=SINGLES)
    msg = str(e.value)
    assert msg.startswith(str(Path(e.value.args[0].split(":")[0])))
    assert "app.yaml: models[2]: model 'meta-llama/Llama-2-70b-chat-hf' fits at no " in msg
    assert "tp=1: does not fit in memory" in msg


def test_cluster_without_the_profile_gpu(load: Loader) -> None:
    h100 = Cluster((Node("n0", "H100-80GB", 8, ((0, 1, 2, 3, 4, 5, 6, 7),)),))
    with pytest.raises(SpecError, match=r"app\.yaml: models: the cluster has no A100-80GB GPUs"):
        load(_ensemble(), {"data/prompts.csv": PROMPTS}, cluster=h100)


def test_csv_bad_prompt_tokens_is_an_error_of_that_row(load: Loader) -> None:
    rows = "id,prompt_tokens\na,10\nb,ten\n"
    app = load(_ensemble(), {"data/prompts.csv": rows})
    bad = [r for r in app.rejected if r.node == "datasets.prompts"]
    assert [r.request_id for r in bad] == ["b"]
    assert "prompts.csv:3: column 'prompt_tokens': expected an integer >= 1, got 'ten'" in (
        bad[0].reason
    )
    assert all("b" not in c.request_ids for c in app.graph.calls)  # the other row goes on
    assert all(c.request_ids == ("a",) for c in app.graph.calls)


@pytest.mark.parametrize(
    ("rows", "rid", "words"),
    [
        ("id,prompt_tokens\na,10\na,11\nb,3\n", "a", "prompts.csv:3: column 'id': duplicate id"),
        ("id,prompt_tokens\na,0\nb,3\n", "a", "prompts.csv:2: column 'prompt_tokens'"),
    ],
)
def test_bad_dataset_rows_are_rejected_one_by_one(
    load: Loader, rows: str, rid: str, words: str
) -> None:
    app = load(_ensemble(), {"data/prompts.csv": rows})
    bad = [r for r in app.rejected if r.node == "datasets.prompts"]
    assert [r.request_id for r in bad] == [rid]
    assert words in bad[0].reason


def test_rows_without_prompt_are_rejected_per_node(load: Loader) -> None:
    app = load(_ensemble(), {"data/prompts.csv": "id,prompt_tokens,prompt\na,,\nb,4,\n"})
    assert {r.request_id for r in app.rejected} == {"a"}
    assert "prompts.csv:2: needs column 'prompt_tokens' or 'prompt'" in app.rejected[0].reason


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ("id,text\na,hi\n", "needs column 'prompt_tokens' or 'prompt'"),
        ("id,prompt_tokens\n", "no usable rows"),
        ("id,prompt_tokens\na,0\n", "no usable rows (first: "),
    ],
)
def test_unusable_datasets_are_refused(load: Loader, rows: str, words: str) -> None:
    with pytest.raises(SpecError, match="app.yaml: ") as e:
        load(_ensemble(), {"data/prompts.csv": rows})
    assert words in str(e.value)


Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Edit:
    """An edit setting ``path`` (dots and [i]) of the document to ``value``."""

    def edit(doc: dict[str, Any]) -> None:
        keys: list[Any] = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace(
            "]", "").split(".")]  # fmt: skip
        target = doc
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return edit


def _all(*edits: Edit) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        for e in edits:
            e(doc)

    return edit


def _model(model: str) -> Edit:
    """Make the first node's model ``model``."""
    return _all(_set("models[0].id", model), _set("nodes[0].model", model))


def _cycle(doc: dict[str, Any]) -> None:
    doc["nodes"][0]["input"] = {"nodes": ["llama"]}
    doc["nodes"][1]["input"] = {"nodes": ["vicuna"]}


def _gpt2xl(doc: dict[str, Any]) -> None:
    doc["models"][0].update(config="gpt2xl.json", tp=[2])


BAD: list[tuple[str, Edit, str, str]] = [
    ("unknown model ref", _set("nodes[0].model", "x"), "nodes[0].model",
     "unknown model 'x' (not in models)"),
    ("unknown model", _model("acme/x"), "models[0].id", "no profile and no architecture"),
    ("bad profile", _set("models[0].profile", "guess"), "models[0].profile",
     "unknown profile choice 'guess'"),
    ("no measured", _all(_model(LLAMA70), _set("models[0].profile", "measured")),
     "models[0].profile", "no measured profile of 'meta-llama/Llama-2-70b-chat-hf' is stored "
     "(stored: analytic tp2,tp4)"),
    ("measured tp", _all(_model("mistralai/Mixtral-8x7B-v0.1"),
     _set("models[0].profile", "measured"), _set("models[0].tp", [1])),
     "models[0].tp", "mistralai/Mixtral-8x7B-v0.1: tp=1: no measured profile is stored"),
    ("unknown twin", _set("models[0].profile", "twin:acme/none"), "models[0].profile",
     "twin 'acme/none' has no stored measured profile"),
    ("twin shape", _set("models[0].profile", "twin:EleutherAI/gpt-j-6b"), "models[0].profile",
     "different architecture (layers 40 vs 28"),
    ("analytic no arch", _all(_model("acme/x"), _set("models[0].profile", "analytic")),
     "models[0].profile",
     "analytic: no architecture for 'acme/x'"),
    ("cycle", _cycle, "nodes[0].input.nodes", "dependency cycle: vicuna -> llama -> vicuna"),
    ("self cycle", _set("nodes[0].input.nodes", ["vicuna"]), "nodes[0].input.nodes",
     "dependency cycle: vicuna -> vicuna"),
    ("unknown upstream", _set("nodes[0].input.nodes", ["ghost"]), "nodes[0].input.nodes[0]",
     "unknown node 'ghost'"),
    ("missing file", _set("datasets.prompts.path", "nope.csv"), "datasets.prompts.path",
     "file not found: "),
    ("bad format", _set("datasets.prompts.path", "notes.txt"), "datasets.prompts.path",
     "unknown format"),
    ("unknown dataset", _set("nodes[1].input.dataset", "other"), "nodes[1].input.dataset",
     "unknown dataset 'other' (datasets: prompts)"),
    ("tp no fit", _all(_model(LLAMA70), _set("models[0].tp", [1])), "models[0].tp",
     "meta-llama/Llama-2-70b-chat-hf: tp=1: does not fit in memory: 128.5 GiB of weights"),
    ("tp refused", _gpt2xl, "models[0].tp",
     "tp=2 does not divide its 25 attention heads (vLLM refuses"),
    ("tp not power", _set("models[0].tp", [3]), "models[0].tp", "tp=3 is not a power of two"),
    ("tp too big", _set("models[0].tp", [1, 4]), "models[0].tp",
     "tp=4 exceeds the largest NVLink island of the cluster's A100-80GB nodes (2 GPUs)"),
    ("tp zero", _set("models[0].tp", [0]), "models[0].tp[0]", "greater than or equal to 1"),
    ("tp twice", _set("models[0].tp", [1, 1]), "models[0].tp", "tp lists a degree twice"),
    ("max len", _set("models[0].max_model_len", 8192), "models[0].max_model_len",
     "8192 exceeds the model's own limit of 4096 tokens"),
    ("temperature", _set("nodes[0].sampling", {"temperature": -1}), "nodes[0].sampling.temperature",
     "greater than or equal to 0"),
    ("top_p 0", _set("nodes[0].sampling", {"top_p": 0}), "nodes[0].sampling.top_p",
     "greater than 0"),
    ("top_p big", _set("defaults.sampling.top_p", 1.5), "defaults.sampling.top_p",
     "less than or equal to 1"),
    ("max_tokens 0", _set("nodes[0].sampling", {"max_tokens": 0}), "nodes[0].sampling.max_tokens",
     "greater than or equal to 1"),
    ("sampling key", _set("nodes[0].sampling", {"beams": 2}), "nodes[0].sampling.beams",
     "Extra inputs are not permitted"),
    ("no max_tokens", _set("defaults", {}), "nodes[0].sampling.max_tokens", "required"),
    ("dup node", _set("nodes[1].name", "vicuna"), "nodes[1].name",
     "duplicate node name 'vicuna' (also nodes[0])"),
    ("dup model", _set("models[1].id", VICUNA), "models[1].id",
     "duplicate model 'lmsys/vicuna-13b-v1.5' (also models[0])"),
    ("both", _set("nodes[0].chain", {"dataset": "prompts", "chunk_tokens": 10}), "nodes[0]",
     "give exactly one of input, chain and route"),
    ("neither", lambda d: d["nodes"][0].pop("input") and None, "nodes[0]",
     "give exactly one of input, chain and route"),
    ("input empty", _set("nodes[0].input", {"repeat": 2}), "nodes[0].input",
     "input needs a dataset or nodes"),
    ("input key", _set("nodes[0].input.filter", {}), "nodes[0].input.filter", "Extra inputs"),
    ("bad name", _set("nodes[0].name", "a.b"), "nodes[0].name", "use letters, digits"),
    ("lengths source", _set("models[0].lengths", "nowhere"), "models[0].lengths",
     "unknown length source 'nowhere'"),
    ("lengths like", _set("models[0].lengths", "like:vicuna-13b"), "models[0].lengths",
     "no authors' output-length pdf for 'vicuna-13b' (close: vicuna-13b-v1.5"),
    ("authors missing", _all(_model("gpt2-xl"), _set("models[0].config", "gpt2xl.json")),
     "models[0].lengths", "authors: no authors' output-length pdf for 'gpt2-xl'"),
    ("config missing", _set("models[0].config", "none.json"), "models[0].config", "none.json"),
    ("where column", _set("nodes[0].input.where", {"lang": "en"}), "nodes[0].input.where.lang",
     "column 'lang' not in dataset 'prompts' (columns: id, prompt_tokens, route)"),
    ("where empty", _set("nodes[0].input.where", {"route": "poems"}), "nodes[0].input.where",
     "no row of dataset 'prompts' matches {'route': 'poems'}"),
    ("all rejected", _set("nodes[0].input.template_tokens", 5000), "nodes[0]",
     "node 'vicuna' has no requests left: all 4 were rejected (first: 'p0': prompt of 5100 tokens"),
    ("chain rejected", _set("nodes[0]", {"name": "s", "model": VICUNA, "chain": {
     "dataset": "prompts", "chunk_tokens": 100, "template_tokens": 4000}}), "nodes[0]",
     "node 's', call 's.0' has no requests left"),
    ("top level", lambda d: d.pop("models") and None, "models", "Field required"),
]  # fmt: skip


GPT2XL = {"model_type": "gpt2", "n_layer": 48, "n_embd": 1600, "n_head": 25, "vocab_size": 50257,
          "n_positions": 1024}  # fmt: skip


@pytest.mark.parametrize(("case", "edit", "field", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_spec_names_file_and_field(
    load: Loader, tmp_path: Path, case: str, edit: Edit, field: str, words: str
) -> None:
    doc = copy.deepcopy(_ensemble())
    edit(doc)
    files = {"data/prompts.csv": PROMPTS, "gpt2xl.json": json.dumps(GPT2XL), "notes.txt": "x"}
    with pytest.raises(SpecError) as e:
        load(doc, files)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'app.yaml'}: {field}: "), msg
    assert words in msg, msg


def test_several_schema_errors_in_one_message(load: Loader) -> None:
    doc = _ensemble()
    doc["nodes"][0]["sampling"] = {"temperature": -1, "top_p": 2}
    with pytest.raises(SpecError) as e:
        load(doc, {"data/prompts.csv": PROMPTS})
    parts = str(e.value).split("; ")
    assert len(parts) == 2
    assert parts[0].endswith("nodes[0].sampling.temperature: Input should be greater than or "
                             "equal to 0")  # fmt: skip
    assert "nodes[0].sampling.top_p" in parts[1]


def test_bad_yaml_and_non_mapping(tmp_path: Path, profiles: ProfileSet, pdfs: AuthorsPdfs) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("models: [\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: invalid YAML"):
        load_app(f, cluster=PAIRS, profiles=profiles, authors_pdfs=pdfs)
    with pytest.raises(SpecError, match=r"^x\.yaml: expected a mapping"):
        parse_app([1], "x.yaml", tmp_path, cluster=PAIRS, profiles=profiles, authors_pdfs=pdfs)


def test_parse_app_uses_base_dir(tmp_path: Path, profiles: ProfileSet, pdfs: AuthorsPdfs) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.csv").write_text(PROMPTS)
    app = parse_app(_ensemble(), "inline", tmp_path, cluster=PAIRS, profiles=profiles,
                    authors_pdfs=pdfs)  # fmt: skip
    assert app.graph.name == "inline"
    assert np.array_equal(app.graph.calls[0].base_prompt_len, [100, 200, 300, 400])
