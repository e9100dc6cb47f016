"""Prompt templates: parsing, escapes, errors with positions, rendering, defaults, routing."""

from __future__ import annotations

import json

import pytest

from apps import prompts
from apps.prompts import (
    Template,
    TemplateError,
    default_prompt,
    numbered,
    parse_template,
    route_choice,
)

DEFAULTS: dict[str, tuple[str, ...]] = {
    "FUSE_TEMPLATE": ("prompt", "inputs"),
    "RANK_TEMPLATE": ("prompt", "inputs"),
    "CHAIN_FIRST_TEMPLATE": ("chunk",),
    "CHAIN_NEXT_TEMPLATE": ("summary", "chunk"),
    "JUDGE_TEMPLATE": ("summary",),
    "ROUTER_TEMPLATE": ("prompt", "labels"),
}


# --- default templates -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_default_template_parses_with_its_placeholders(name: str) -> None:
    template = parse_template(getattr(prompts, name))
    assert template.fields == DEFAULTS[name]


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_default_template_renders_every_value(name: str) -> None:
    template = parse_template(getattr(prompts, name))
    values = {field: f"<<{field.upper()} VALUE>>" for field in template.fields}
    out = template.render(values)
    for field in template.fields:
        assert out.count(f"<<{field.upper()} VALUE>>") == 1
    assert "{" + template.fields[0] + "}" not in out
    assert len(out) == len(template.fixed_text()) + sum(len(v) for v in values.values())


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_default_template_names_each_missing_value(name: str) -> None:
    template = parse_template(getattr(prompts, name))
    for missing in template.fields:
        values = {field: "x" for field in template.fields if field != missing}
        with pytest.raises(TemplateError, match=rf"placeholder '\{{{missing}\}}'"):
            template.render(values)


def test_judge_template_asks_for_valid_json_with_both_keys() -> None:
    out = parse_template(prompts.JUDGE_TEMPLATE).render({"summary": "A short summary."})
    answer = json.loads(out[out.rindex("{") :])
    assert set(answer) == set(prompts.JUDGE_KEYS) == {"easy_to_understand", "grammatical"}
    assert all(isinstance(v, bool) for v in answer.values())


def test_fuse_template_carries_prompt_and_numbered_inputs() -> None:
    inputs = numbered([("llama", "Paris."), ("vicuna", "It is Paris.")])
    out = parse_template(prompts.FUSE_TEMPLATE).render(
        {"prompt": "Capital of France?", "inputs": inputs}
    )
    assert "Capital of France?" in out
    assert out.index("[1] llama\nParis.") < out.index("[2] vicuna\nIt is Paris.")


# --- parsing ---------------------------------------------------------------------------------


def test_fields_are_distinct_in_order_of_first_appearance() -> None:
    template = parse_template("{b} and {a-1} then {b} and {_c} and {a-1}")
    assert template == Template("{b} and {a-1} then {b} and {_c} and {a-1}", ("b", "a-1", "_c"))


def test_template_without_placeholders() -> None:
    template = parse_template("plain text")
    assert template.fields == ()
    assert template.render({}) == "plain text"
    assert template.fixed_text() == "plain text"
    assert parse_template("").fields == ()


def test_escaped_braces_are_literal() -> None:
    template = parse_template('{{"k": {v}}} {{x}} }}{{')
    assert template.fields == ("v",)
    assert template.render({"v": "1"}) == '{"k": 1} {x} }{'
    assert template.fixed_text() == '{"k": } {x} }{'


def test_value_with_braces_is_not_reparsed() -> None:
    template = parse_template("[{a}]")
    assert template.render({"a": "{b} }"}) == "[{b} }]"


def test_render_repeats_values_and_ignores_extra_ones() -> None:
    template = parse_template("{x}-{y}-{x}")
    assert template.render({"x": "1", "y": "2", "unused": "3"}) == "1-2-1"


def test_fixed_text_drops_placeholders() -> None:
    template = parse_template("Summary: {summary}\nNext: {chunk}.")
    assert template.fixed_text() == "Summary: \nNext: ."


def test_missing_value_error_names_placeholder_and_position() -> None:
    template = parse_template("ab {x} {y}")
    with pytest.raises(TemplateError, match=r"^position 7: no value for placeholder '\{y\}'$"):
        template.render({"x": "1"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hello {name", r"^position 6: unclosed '\{'$"),
        ("{", r"^position 0: unclosed '\{'$"),
        ("ok {{ then {", r"^position 11: unclosed '\{'$"),
        ("a } b", r"^position 2: single '\}'"),
        ("{x}}", r"^position 3: single '\}'"),
        ("end }", r"^position 4: single '\}'"),
        ("a {} b", r"^position 2: invalid placeholder name ''$"),
        ("ab {two words}", r"^position 3: invalid placeholder name 'two words'$"),
        ("{ x }", r"^position 0: invalid placeholder name ' x '$"),
        ("x {1abc}", r"^position 2: invalid placeholder name '1abc'$"),
        ("x {a.b}", r"^position 2: invalid placeholder name 'a.b'$"),
        ("{a{b}", r"^position 0: invalid placeholder name 'a\{b'$"),
        ("{ok} {-x}", r"^position 5: invalid placeholder name '-x'$"),
    ],
)
def test_bad_braces_name_problem_and_position(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        parse_template(text)


def test_template_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_template("}")


# --- numbered and default prompts ------------------------------------------------------------


def test_numbered_lists_items_with_labels() -> None:
    text = numbered([("m-1", "first\nanswer"), ("m2", "second")])
    assert text == "[1] m-1\nfirst\nanswer\n\n[2] m2\nsecond"


def test_numbered_single_and_empty() -> None:
    assert numbered([("only", "text")]) == "[1] only\ntext"
    assert numbered([]) == ""


def test_default_prompt_joins_own_and_upstream_texts() -> None:
    upstream = [("a", "out a"), ("b", "out b")]
    assert default_prompt("Do it.", upstream) == "Do it.\n\nout a\n\nout b"
    assert default_prompt("", upstream) == "out a\n\nout b"
    assert default_prompt("Do it.", []) == "Do it."


def test_default_prompt_skips_empty_parts() -> None:
    assert default_prompt("", [("a", ""), ("b", "out b"), ("c", "  \n")]) == "out b"
    assert default_prompt("", []) == ""


# --- routing ---------------------------------------------------------------------------------


def test_route_choice_takes_earliest_label() -> None:
    labels = ["vicuna", "llama"]
    assert route_choice("llama is better than vicuna here", labels) == "llama"
    assert route_choice("Answer: vicuna (not llama)", labels) == "vicuna"


def test_route_choice_is_case_insensitive_and_returns_label_as_given() -> None:
    assert route_choice("I pick LLAMA-2.", ["Llama-2", "gpt"]) == "Llama-2"


def test_route_choice_needs_whole_words() -> None:
    labels = ["llama", "gpt"]
    assert route_choice("codellama and gpt4 and llama_x", labels) is None
    assert route_choice("llama-2 then gpt", labels) == "gpt"
    assert route_choice("(llama)", labels) == "llama"


def test_route_choice_prefers_longer_label_at_same_position() -> None:
    labels = ["gpt", "gpt-3.5", "gpt-3.5-turbo"]
    assert route_choice("gpt-3.5-turbo.", labels) == "gpt-3.5-turbo"
    assert route_choice("gpt-3.5 please", labels) == "gpt-3.5"
    assert route_choice("gpt/3.5", labels) == "gpt"


def test_route_choice_labels_with_slash_and_dot_are_literal() -> None:
    labels = ["meta-llama/Llama-2-7b-chat-hf", "lmsys/vicuna-13b-v1.5"]
    text = "Best: lmsys/vicuna-13b-v1.5, then meta-llama/Llama-2-7b-chat-hf"
    assert route_choice(text, labels) == "lmsys/vicuna-13b-v1.5"
    assert route_choice("lmsys/vicuna-13bXv1.5", labels) is None  # '.' is not a wildcard
    assert route_choice("x/lmsys/vicuna-13b-v1.5", labels) == "lmsys/vicuna-13b-v1.5"


def test_route_choice_none_when_no_label() -> None:
    assert route_choice("I cannot decide.", ["a1", "b2"]) is None
    assert route_choice("", ["a1"]) is None
    assert route_choice("anything", []) is None
    assert route_choice("anything", [""]) is None
