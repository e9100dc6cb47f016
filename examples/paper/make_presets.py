"""Write the paper-workload presets: small per-request token tables and five application specs.

Everything is derived from the shared data folder (``load_settings().shared_dir / "data"``) with
numpy's ``default_rng(0)``; running the script twice writes identical files. Raw text is never
written, only per-request token counts.

- ``data/no_robots_1k.csv``, ``data/no_robots_10k.csv`` (``id,prompt_tokens``): ensemble prompts.
  From ``no_robots_test.parquet`` (500 rows): the prompt is ``messages[0].content`` (the
  authors' convention), its tokens estimated by ``apps.tokens.estimate_tokens`` (4 bytes/token);
  1000 / 10000 rows drawn with replacement. MixInstruct, which the paper used, is not available.
- ``data/routing_10k.csv``, ``data/routing_1k.csv`` (``id,prompt_tokens,route``): routed prompts.
  Prompt tokens are ``num_prefill_tokens`` of the Azure traces as they are: the first 1500 rows
  of ``vidur_splitwise_code.csv.gz`` go to CodeLlama-34b-Instruct; the first 8500 rows of
  ``vidur_splitwise_conv.csv.gz`` are split 2000 / 2500 / 2000 / 2000 over Llama-2-70b-chat,
  Mixtral-8x7B-Instruct, WizardLM-13B and Mistral-7B-Instruct by a seeded permutation of the
  labels. The 10,000 rows are then shuffled (seeded); ``routing_1k`` is the first 1000 of them.
  Ids name the source row (``conv<row>`` / ``code<row>``).
- ``data/arxiv_docs_100.csv`` (``id,prompt_tokens``): 100 documents for chain summary,
  ``num_prefill_tokens`` of 100 rows of
  ``vidur_arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv.gz`` sampled without
  replacement.
- ``ensemble_1k.yaml``, ``ensemble_10k.yaml``, ``routing_10k.yaml``,
  ``chain_summary_100docs.yaml`` and ``mixed.yaml`` (method.md §7).

It also prints, per routed model, how many prompts leave no room for one output token within the
model's context (``prompt_tokens >= max_model_len`` of the default profile set); the spec loader
rejects those requests.
"""

from __future__ import annotations

import csv
import gzip
import io
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

from apps.tokens import BYTES_PER_TOKEN, estimate_tokens
from coordinator.settings import load_settings
from planning.io.profiles import load_default_profiles

SEED = 0
HERE = Path(__file__).resolve().parent
DATA_OUT = HERE / "data"

NO_ROBOTS = "no_robots_test.parquet"
CONV_TRACE = "vidur_splitwise_conv.csv.gz"
CODE_TRACE = "vidur_splitwise_code.csv.gz"
ARXIV = "vidur_arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv.gz"

# BooookScore's incremental-update template (lilakk/BooookScore,
# prompts/get_summaries_inc/intermediate.txt): 1002 ASCII characters including two "{}"
# placeholders (chunk, summary so far), so 998 bytes of fixed text. Its "init" template for the
# first chunk is 886 bytes (~222 tokens); the larger one is used for every chunk.
BOOOOKSCORE_INC_TEMPLATE_BYTES = 998
SUMMARY_TEMPLATE_TOKENS = round(BOOOOKSCORE_INC_TEMPLATE_BYTES / BYTES_PER_TOKEN)

# The authors' evaluator prompt is not in their repository; this stand-in asks what method.md
# §7.3 says the evaluator answers (JSON: easy to understand? grammatical?). Only its length is used.
JUDGE_TEMPLATE = (
    "Below is a summary of a document:\n\n---\n\n{}\n\n---\n\n"
    "Read the summary and judge it on two questions: (1) Is it easy to understand? "
    "(2) Is it grammatical? Answer only with a JSON object of the form "
    '{"easy_to_understand": true or false, "grammatical": true or false, '
    '"reason": "<one sentence>"}.\n\nJSON answer:'
)
JUDGE_TEMPLATE_TOKENS = estimate_tokens(JUDGE_TEMPLATE.replace("{}", ""))

CHUNK_TOKENS = 2048
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}
HEADER_WIDTH = 98  # YAML header comment lines, without the "# "
FLOW_MAX_CHARS = 72  # a flat mapping longer than this is written in block style
CLUSTER_HINT = "examples/clusters/a100x8_nvlink_pairs.yaml"


@dataclass(frozen=True)
class ModelChoice:
    """One model of a preset: its HF id, profile source and length distribution."""

    hf_id: str
    node: str  # node-name slug
    profile: str  # measured | analytic | twin:<HF id>
    lengths: str  # authors | like:<HF id>
    why: str  # one line for the YAML header

    def spec(self) -> dict[str, str]:
        return BlockMap(id=self.hf_id, profile=self.profile, lengths=self.lengths)


class BlockMap(dict):
    """A mapping always written in block style (model entries)."""


MEASURED = "measured A100 profile (vLLM 0.3.0 fork logs); authors' output-length pdf"
ANALYTIC = "analytic roofline profile calibrated on the measured models; authors' pdf"

ENSEMBLE_MODELS = (
    ModelChoice("lmsys/vicuna-13b-v1.5", "vicuna", "measured", "authors", MEASURED),
    ModelChoice(
        "OpenAssistant/oasst-sft-4-pythia-12b-epoch-3.5", "oasst", "measured", "authors", MEASURED
    ),
    ModelChoice("chavinlo/alpaca-13b", "alpaca", "measured", "authors", MEASURED),
    ModelChoice("project-baize/baize-v2-13b", "baize", "measured", "authors", MEASURED),
    ModelChoice("TheBloke/koala-13B-HF", "koala", "measured", "authors", MEASURED),
    ModelChoice("databricks/dolly-v2-12b", "dolly", "measured", "authors", MEASURED),
    ModelChoice("mosaicml/mpt-7b-chat", "mpt", "measured", "authors", MEASURED),
    ModelChoice("THUDM/chatglm3-6b", "chatglm3", "measured", "authors", MEASURED),
    ModelChoice(
        "stabilityai/stablelm-tuned-alpha-7b",
        "stablelm",
        "analytic",
        "like:mosaicml/mpt-7b-chat",
        "analytic roofline profile calibrated on the measured models; no authors' pdf, so the "
        "pdf of mosaicml/mpt-7b-chat (a 7B chat model of the same LLM-Blender set)",
    ),
)

LLAMA70_CHAT = ModelChoice(
    "meta-llama/Llama-2-70b-chat-hf", "llama70b", "analytic", "authors", ANALYTIC
)
VICUNA = ENSEMBLE_MODELS[0]


@dataclass(frozen=True)
class Route:
    """One RouterBench model with its share of the 10,000 routed prompts and its trace."""

    model: ModelChoice
    count: int
    trace: str  # "code" or "conv"

    @property
    def label(self) -> str:
        return self.model.hf_id.split("/")[-1]


ROUTES = (
    Route(LLAMA70_CHAT, 2000, "conv"),
    Route(
        ModelChoice(
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            "mixtral",
            "twin:mistralai/Mixtral-8x7B-v0.1",
            "authors",
            "measured profile of its twin mistralai/Mixtral-8x7B-v0.1 (same config); authors' pdf",
        ),
        2500,
        "conv",
    ),
    Route(
        ModelChoice(
            "WizardLMTeam/WizardLM-13B-V1.2",
            "wizardlm",
            "twin:NousResearch/Llama-2-13b-hf",
            "authors",
            "measured profile of its twin NousResearch/Llama-2-13b-hf (same config); authors' pdf",
        ),
        2000,
        "conv",
    ),
    Route(
        ModelChoice(
            "meta-llama/CodeLlama-34b-Instruct-hf", "codellama", "analytic", "authors", ANALYTIC
        ),
        1500,
        "code",
    ),
    Route(
        ModelChoice(
            "mistralai/Mistral-7B-Instruct-v0.2", "mistral", "analytic", "authors", ANALYTIC
        ),
        2000,
        "conv",
    ),
)
ROUTE_SPLIT_LINES = (
    "  code trace -> CodeLlama-34b-Instruct-hf 15% (1500); conversation trace -> rest:",
    "  Llama-2-70b-chat-hf 20% (2000), Mixtral-8x7B-Instruct-v0.1 25% (2500),",
    "  WizardLM-13B-V1.2 20% (2000), Mistral-7B-Instruct-v0.2 20% (2000)",
)


# ---------------------------------------------------------------- reading the shared data


def read_trace_column(path: Path, column: str) -> np.ndarray:
    """One integer column of a gzipped CSV trace, in file order."""
    with gzip.open(path, "rt", newline="") as f:
        return np.array([int(row[column]) for row in csv.DictReader(f)], dtype=np.int64)


def no_robots_prompt_tokens(path: Path) -> np.ndarray:
    """Estimated tokens of ``messages[0].content`` for every row of the no_robots parquet."""
    messages = pq.read_table(path, columns=["messages"]).column("messages").to_pylist()
    return np.array([estimate_tokens(m[0]["content"]) for m in messages], dtype=np.int64)


# ---------------------------------------------------------------- deriving the tables

Rows = list[tuple[Any, ...]]


def draw_no_robots(tokens: np.ndarray, n: int) -> Rows:
    """``n`` prompts drawn with replacement (seed 0), ids ``nr<k>``."""
    picks = np.random.default_rng(SEED).integers(0, tokens.size, size=n)
    return [(f"nr{k}", int(tokens[i])) for k, i in enumerate(picks)]


def routed_prompts(conv: np.ndarray, code: np.ndarray) -> Rows:
    """The 10,000 routed prompts: first rows of each trace, seeded labels, seeded order."""
    rng = np.random.default_rng(SEED)
    code_n = sum(r.count for r in ROUTES if r.trace == "code")
    conv_labels = np.array([r.label for r in ROUTES if r.trace == "conv" for _ in range(r.count)])
    conv_labels = conv_labels[rng.permutation(conv_labels.size)]
    code_label = next(r.label for r in ROUTES if r.trace == "code")
    rows: Rows = [(f"code{i}", int(code[i]), code_label) for i in range(code_n)]
    rows += [(f"conv{i}", int(conv[i]), str(lab)) for i, lab in enumerate(conv_labels)]
    return [rows[i] for i in rng.permutation(len(rows))]


def sample_docs(tokens: np.ndarray, n: int) -> Rows:
    """``n`` arXiv documents sampled without replacement (seed 0), ids ``doc<k>``."""
    picks = np.random.default_rng(SEED).choice(tokens.size, size=n, replace=False)
    return [(f"doc{k}", int(tokens[i])) for k, i in enumerate(picks)]


def write_csv(name: str, header: tuple[str, ...], rows: Rows) -> Path:
    """Write ``data/<name>`` with LF line ends."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path = DATA_OUT / name
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


# ---------------------------------------------------------------- building the specs


def model_header(models: list[ModelChoice]) -> list[str]:
    """Header lines per model: its profile and length choice, and why."""
    lines = []
    for m in models:
        lines.append(f"  - {m.hf_id}")
        lines.append(f"      profile {m.profile}; lengths {m.lengths}")
        lines += textwrap.wrap(
            m.why, width=HEADER_WIDTH, initial_indent="      - ", subsequent_indent="        "
        )
    return lines


def with_cap(node: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """``node`` with a per-node ``max_tokens`` (None: the spec's default applies)."""
    return node if max_tokens is None else {**node, "sampling": {"max_tokens": max_tokens}}


def ensemble_nodes(dataset: str, prefix: str = "", cap: int | None = None) -> list[dict]:
    nodes = [
        {"name": f"{prefix}{m.node}", "model": m.hf_id, "input": {"dataset": dataset}}
        for m in ENSEMBLE_MODELS
    ]
    return [with_cap(n, cap) for n in nodes]


def routing_nodes(dataset: str, prefix: str = "", cap: int | None = None) -> list[dict]:
    nodes = [
        {
            "name": f"{prefix}{r.model.node}",
            "model": r.model.hf_id,
            "input": {"dataset": dataset, "where": {"route": r.label}},
        }
        for r in ROUTES
    ]
    return [with_cap(n, cap) for n in nodes]


def chain_nodes(dataset: str, prefix: str = "", cap: int | None = None) -> list[dict]:
    summary = f"{prefix}summary"
    chain = {
        "dataset": dataset,
        "chunk_tokens": CHUNK_TOKENS,
        "template_tokens": SUMMARY_TEMPLATE_TOKENS,
    }
    judge_input = {"nodes": [summary], "repeat": 5, "template_tokens": JUDGE_TEMPLATE_TOKENS}
    nodes = [
        {"name": summary, "model": VICUNA.hf_id, "chain": chain},
        {"name": f"{prefix}judge", "model": LLAMA70_CHAT.hf_id, "input": judge_input},
    ]
    return [with_cap(n, cap) for n in nodes]


def unique_models(models: list[ModelChoice]) -> list[ModelChoice]:
    seen: dict[str, ModelChoice] = {}
    for m in models:
        seen.setdefault(m.hf_id, m)
    return list(seen.values())


def spec(
    name: str,
    description: str,
    models: list[ModelChoice],
    datasets: dict[str, str],
    nodes: list[dict],
    max_tokens: int | None = None,
) -> dict[str, Any]:
    sampling: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
    return {
        "name": name,
        "description": description,
        "defaults": {"sampling": {**sampling, **SAMPLING_DEFAULTS}},
        "models": [m.spec() for m in unique_models(models)],
        "datasets": {k: {"path": v} for k, v in datasets.items()},
        "nodes": nodes,
    }


ENSEMBLE_HEADER = [
    "Reproduces LLM ensembling (LLM-Blender, test case `general`), method.md §7.1: nine models,",
    "each answers every prompt; max_tokens 512, temperature 1.0, top_p 1.0.",
    "Prompt lengths: data/{data} - no_robots test prompts (messages[0].content, the authors'",
    "convention; MixInstruct is not available), tokens estimated at 4 bytes/token",
    "(apps.tokens.estimate_tokens), {n} rows drawn with replacement, seed 0.",
]
ROUTING_HEADER = [
    "Reproduces LLM routing (RouterBench, test case `router`), method.md §7.2: five models, each",
    "receiving the prompts routed to it; max_tokens 4096.",
    "Prompt lengths: data/{data} - num_prefill_tokens of the Azure traces (Vidur's splitwise",
    "conv/code files), first rows of each trace in order; labels and row order shuffled with",
    "seed 0.",
    "RouterBench's own prompts and labels are not available. Route split of the 10,000 prompts:",
    *ROUTE_SPLIT_LINES,
    "Prompts at or above a model's context (max_model_len) are kept; the loader rejects them.",
]
CHAIN_HEADER = [
    "Reproduces chain summary (BooookScore-style incremental update, test case `chain-summary`),",
    "method.md §7.3: lmsys/vicuna-13b-v1.5 summarises each document chunk by chunk (2048-token",
    "chunks, each chunk's prompt = chunk + previous summary + template); then",
    "meta-llama/Llama-2-70b-chat-hf judges each final summary 5 times. max_tokens 900 for both.",
    "Prompt lengths: data/arxiv_docs_100.csv - num_prefill_tokens (Llama-2 tokenizer) of 100 rows",
    "of Vidur's arXiv summarisation stats, sampled without replacement with seed 0. BooookScore's",
    "books are not available; these papers (<= 4054 tokens) make chains of 1-2 chunks.",
    f"template_tokens {SUMMARY_TEMPLATE_TOKENS}: BooookScore's incremental-update template",
    "(prompts/get_summaries_inc/intermediate.txt, 998 bytes of fixed text) at 4 bytes/token.",
    f"Judge template_tokens {JUDGE_TEMPLATE_TOKENS}: a stand-in JSON grading prompt (see",
    "examples/paper/make_presets.py); the authors' evaluator prompt is not available.",
]


def header(title: str, lines: list[str], models: list[ModelChoice]) -> str:
    body = [title, *lines, "Models (profile: where its latency model comes from; lengths):"]
    body += model_header(unique_models(models))
    body += [
        f"Meant for {CLUSTER_HINT} (8 A100-80GB, NVLink pairs).",
        "Written by examples/paper/make_presets.py; do not edit.",
    ]
    return "".join(f"# {line}\n" if line else "#\n" for line in body)


def ensemble_spec(n_label: str, data: str, n: int) -> tuple[str, dict[str, Any]]:
    text = header(
        f"ensemble_{n_label}",
        [s.format(data=data, n=n) for s in ENSEMBLE_HEADER],
        list(ENSEMBLE_MODELS),
    )
    doc = spec(
        f"ensemble_{n_label}",
        f"LLM-Blender ensemble: 9 models x {n} no_robots prompts (method.md 7.1)",
        list(ENSEMBLE_MODELS),
        {"prompts": f"data/{data}"},
        ensemble_nodes("prompts"),
        max_tokens=512,
    )
    return text, doc


def routing_spec() -> tuple[str, dict[str, Any]]:
    models = [r.model for r in ROUTES]
    lines = [s.format(data="routing_10k.csv") for s in ROUTING_HEADER]
    doc = spec(
        "routing_10k",
        "RouterBench-style routing: 10,000 Azure-trace prompts over 5 models (method.md 7.2)",
        models,
        {"routing": "data/routing_10k.csv"},
        routing_nodes("routing"),
        max_tokens=4096,
    )
    return header("routing_10k", lines, models), doc


def chain_spec() -> tuple[str, dict[str, Any]]:
    models = [VICUNA, LLAMA70_CHAT]
    doc = spec(
        "chain_summary_100docs",
        "Chain summary of 100 arXiv papers by vicuna-13b, 5 judgements each (method.md 7.3)",
        models,
        {"docs": "data/arxiv_docs_100.csv"},
        chain_nodes("docs"),
        max_tokens=900,
    )
    return header("chain_summary_100docs", CHAIN_HEADER, models), doc


def mixed_spec() -> tuple[str, dict[str, Any]]:
    models = [*ENSEMBLE_MODELS, *(r.model for r in ROUTES), VICUNA, LLAMA70_CHAT]
    lines = [
        "Reproduces the mixed application, method.md §7.4 ([inferred] a union of the three",
        "graphs): ensemble (ens_*) over no_robots_1k, routing (route_*) over the first 1000",
        "routed prompts (data/routing_1k.csv) and chain summary (chain_*) over the 100 docs.",
        "Each part is set up as in ensemble_1k.yaml, routing_10k.yaml and",
        "chain_summary_100docs.yaml; see their headers for the data derivations.",
        f"chain_summary template_tokens {SUMMARY_TEMPLATE_TOKENS} (BooookScore incremental-update",
        f"template at 4 bytes/token); chain_judge template_tokens {JUDGE_TEMPLATE_TOKENS}",
        "(stand-in grading prompt).",
        "Route split of the 10,000 prompts that routing_1k is the first 1000 of:",
        *ROUTE_SPLIT_LINES,
    ]
    doc = spec(
        "mixed",
        "Ensemble 1k + routing 1k + chain summary 100 docs in one job (method.md 7.4)",
        models,
        {
            "ens_prompts": "data/no_robots_1k.csv",
            "route_prompts": "data/routing_1k.csv",
            "chain_docs": "data/arxiv_docs_100.csv",
        },
        ensemble_nodes("ens_prompts", "ens_", cap=512)
        + routing_nodes("route_prompts", "route_", cap=4096)
        + chain_nodes("chain_docs", "chain_", cap=900),
    )
    return header("mixed", lines, models), doc


class _SpecDumper(yaml.SafeDumper):
    """Block YAML; a mapping of scalars goes on one line when it is short."""


def _flat(values: Any) -> bool:
    return all(not isinstance(v, dict | list) for v in values)


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    flow = _flat(data.values()) and len(str(data)) <= FLOW_MAX_CHARS
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


def _represent_block_map(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=False)


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=_flat(data))


_SpecDumper.add_representer(dict, _represent_dict)
_SpecDumper.add_representer(BlockMap, _represent_block_map)
_SpecDumper.add_representer(list, _represent_list)


def write_spec(filename: str, text: str, doc: dict[str, Any]) -> Path:
    """Header comments, then the spec as block YAML with short flow-style leaves."""
    body = yaml.dump(doc, Dumper=_SpecDumper, sort_keys=False, width=100, allow_unicode=True)
    if yaml.safe_load(body) != doc:
        raise AssertionError(f"{filename}: YAML round trip changed the spec")
    path = HERE / filename
    path.write_text(text + body, encoding="utf-8")
    return path


# ---------------------------------------------------------------- report


def over_context(rows: Rows) -> dict[str, tuple[int, int, int]]:
    """Per route label: (prompts, max_model_len, prompts with prompt_tokens >= max_model_len)."""
    profiles = load_default_profiles()
    out = {}
    for r in ROUTES:
        lens = [v.max_model_len for (m, _), v in profiles.profiles.items() if m == r.model.hf_id]
        limit = min(lens)
        mine = [p for _, p, lab in rows if lab == r.label]
        out[r.label] = (len(mine), limit, sum(p >= limit for p in mine))
    return out


def describe(path: Path, rows: Rows) -> None:
    toks = np.array([r[1] for r in rows])
    print(
        f"wrote {path.relative_to(HERE.parents[1])}: {len(rows)} rows, {path.stat().st_size} B, "
        f"prompt_tokens min {toks.min()} mean {toks.mean():.1f} max {toks.max()}"
    )


def main() -> None:
    src = load_settings().shared_dir / "data"
    DATA_OUT.mkdir(parents=True, exist_ok=True)
    nr_tokens = no_robots_prompt_tokens(src / NO_ROBOTS)
    tables: dict[str, tuple[tuple[str, ...], Rows]] = {
        "no_robots_1k.csv": (("id", "prompt_tokens"), draw_no_robots(nr_tokens, 1000)),
        "no_robots_10k.csv": (("id", "prompt_tokens"), draw_no_robots(nr_tokens, 10000)),
    }
    routed = routed_prompts(
        read_trace_column(src / CONV_TRACE, "num_prefill_tokens"),
        read_trace_column(src / CODE_TRACE, "num_prefill_tokens"),
    )
    tables["routing_10k.csv"] = (("id", "prompt_tokens", "route"), routed)
    tables["routing_1k.csv"] = (("id", "prompt_tokens", "route"), routed[:1000])
    docs = sample_docs(read_trace_column(src / ARXIV, "num_prefill_tokens"), 100)
    tables["arxiv_docs_100.csv"] = (("id", "prompt_tokens"), docs)
    for name, (head, rows) in tables.items():
        describe(write_csv(name, head, rows), rows)

    for filename, (text, doc) in {
        "ensemble_1k.yaml": ensemble_spec("1k", "no_robots_1k.csv", 1000),
        "ensemble_10k.yaml": ensemble_spec("10k", "no_robots_10k.csv", 10000),
        "routing_10k.yaml": routing_spec(),
        "chain_summary_100docs.yaml": chain_spec(),
        "mixed.yaml": mixed_spec(),
    }.items():
        path = write_spec(filename, text, doc)
        print(f"wrote {path.relative_to(HERE.parents[1])}: {path.stat().st_size} B")

    chunks = Counter(-(-p // CHUNK_TOKENS) for _, p in docs)
    by_chunks = dict(sorted(chunks.items()))
    print(f"chain: documents by number of {CHUNK_TOKENS}-token chunks: {by_chunks}")
    print(f"template_tokens: summary {SUMMARY_TEMPLATE_TOKENS}, judge {JUDGE_TEMPLATE_TOKENS}")
    for label, rows in (("routing_10k", routed), ("routing_1k", routed[:1000])):
        print(f"{label}: prompts / max_model_len / prompts >= max_model_len, per route:")
        for route, (n, limit, over) in over_context(rows).items():
            print(f"  {route}: {n} / {limit} / {over}")


if __name__ == "__main__":
    main()
