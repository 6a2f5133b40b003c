"""Prompt templates and rendering: exact paper text, the fixed default, own templates, errors."""

from __future__ import annotations

import pyarrow as pa
import pytest

from binllm_core.config import PromptConfig
from binllm_core.errors import ConfigError, DataError
from binllm_core.prompts.render import PROMPT_SCHEMA, Lookups, lookups_from_tables, render_table
from binllm_core.prompts.templates import templates_from_config
from tests.builders import SAMPLE_SCHEMA

LOOKUPS = Lookups(
    titles={1: "Star Wars (1977)", 2: "Blade Runner (1982)", 3: "Deconstructing Harry (1997)"},
    user_codes={"binary": {7: "0101"}, "dotdec": {7: "5.1"}},
    item_codes={"binary": {3: "1100"}, "dotdec": {3: "12.0"}},
)


def sample(history: list[int], uid: int = 7, iid: int = 3) -> pa.Table:
    row = dict(
        sample_id=11,
        split="train",
        valid_small=False,
        uid=uid,
        iid=iid,
        label=1,
        not_cold=True,
        warm=False,
        history=history,
    )
    return pa.Table.from_pylist([row], schema=SAMPLE_SCHEMA)


def render(cfg: PromptConfig, history: list[int], modes: list[str]) -> list[str]:
    table = render_table(sample(history), LOOKUPS, templates_from_config(cfg), modes, 10)
    return table["prompt"].to_pylist()


def test_paper_text_is_exact() -> None:
    cfg = PromptConfig(style="paper", domain="movie")
    text, binary, dotdec = render(cfg, [1, 2], ["text", "binary", "dotdec"])
    assert text == (
        '#Question: A user has given high ratings to the following movies: "Star Wars (1977)", '
        '"Blade Runner (1982)". Leverage the information to predict whether the user would enjoy '
        'the movie titled "Deconstructing Harry (1997)"? Answer with "Yes" or "No". \\n#Answer:'
    )
    assert binary == (
        '#Question: A user has given high ratings to the following movies: "Star Wars (1977)", '
        '"Blade Runner (1982)". Additionally, we have information about the user\'s preferences '
        "encoded in the feature 0101. Using all available information, make a prediction about "
        'whether the user would enjoy the movie titled "Deconstructing Harry (1997)" with the '
        'feature 1100? Answer with "Yes" or "No". \\n#Answer:'
    )
    assert "feature 5.1." in dotdec and "feature 12.0?" in dotdec
    assert "\n" not in binary and binary.endswith(' "No". \\n#Answer:')


def test_paper_books_and_empty_history() -> None:
    (prompt,) = render(PromptConfig(style="paper", domain="book"), [], ["binary"])
    assert prompt.startswith(
        "#Question: A user has given high ratings to the following books: unkow. Additionally"
    )
    assert 'enjoy the book titled "Deconstructing Harry (1997)" with the feature 1100?' in prompt


def test_default_fixes_the_quirks() -> None:
    (prompt,) = render(PromptConfig(), [], ["text"])
    assert "following movies: none." in prompt
    assert prompt.endswith('Answer with "Yes" or "No".\n#Answer:')
    assert "\\n" not in prompt


def test_history_keeps_the_last_titles_oldest_first() -> None:
    cfg = PromptConfig(text_template="<ItemTitleList>|<TargetItemTitle>")
    templates = templates_from_config(cfg)
    table = render_table(sample([2, 2, 3, 1]), LOOKUPS, templates, ["text"], 2)
    expected = '"Deconstructing Harry (1997)", "Star Wars (1977)"|"Deconstructing Harry (1997)"'
    assert table["prompt"].to_pylist() == [expected]


def test_own_template_and_one_pass_fill() -> None:
    lookups = Lookups({1: "<UserID> the movie", 3: "x"}, LOOKUPS.user_codes, LOOKUPS.item_codes)
    template = "U=<UserID> I=<TargetItemID> T=<TargetItemTitle> H=<ItemTitleList>"
    cfg = PromptConfig(code_template=template)
    templates = templates_from_config(cfg)
    table = render_table(sample([1]), lookups, templates, ["binary"], 10)
    assert table["prompt"].to_pylist() == ['U=0101 I=1100 T="x" H="<UserID> the movie"']


def test_schema_and_row_order() -> None:
    table = render_table(
        sample([1]),
        LOOKUPS,
        templates_from_config(PromptConfig()),
        ["text", "binary", "dotdec"],
        10,
    )
    assert table.schema == PROMPT_SCHEMA
    assert table["mode"].to_pylist() == ["text", "binary", "dotdec"]
    assert table["sample_id"].to_pylist() == [11, 11, 11]


@pytest.mark.parametrize(
    "cfg, message",
    [
        (PromptConfig(code_template="<UserID> <TargetItemID> <Foo>"), "unknown placeholder <Foo>"),
        (PromptConfig(code_template="<UserID> only"), "lacks the placeholder <TargetItemID>"),
        (PromptConfig(modes=["text", "ipv6"]), "prompts.modes has ipv6"),
    ],
)
def test_bad_templates_are_one_line_errors(cfg: PromptConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        templates_from_config(cfg)
    assert "\n" not in str(err.value)


def test_missing_code_is_a_clear_error() -> None:
    templates = templates_from_config(PromptConfig())
    with pytest.raises(DataError, match="user uid=8 has no binary code: the encoder never saw it"):
        render_table(sample([1], uid=8), LOOKUPS, templates, ["text", "binary"], 10)
    # Text prompts need no codes.
    assert render_table(sample([1], uid=8), LOOKUPS, templates, ["text"], 10).num_rows == 1


def test_lookups_from_tables() -> None:
    items = pa.table({"item": ["m1", "m2"], "title": ["One", None]})
    item_map = pa.table({"item": ["m1", "m2"], "iid": pa.array([1, 2], pa.int32())})
    codes = pa.table(
        {
            "entity": ["user", "item"],
            "id": pa.array([1, 2], pa.int32()),
            "bits": pa.array([[0] * 7 + [1], [1] + [0] * 7], pa.list_(pa.uint8(), 8)),
        }
    )
    lookups = lookups_from_tables(items, item_map, codes)
    assert lookups.titles == {1: "One", 2: "m2"}
    # Every format's text comes from the bits, whichever formats the encoder wrote.
    assert lookups.user_codes["binary"] == {1: "00000001"}
    assert lookups.item_codes["dotdec"] == {2: "128"}
    assert lookups.item_codes["hex"] == {2: "80"}
