"""Prompt files (JSON, TXT, I2P CSV), their error messages, and the built-in template/world sets."""

from __future__ import annotations

import hashlib
import json

import pytest

from diffunlearn.data.templates import TEMPLATES
from diffunlearn.errors import UserError
from diffunlearn.evaluate.prompt_sets import (
    PromptSet,
    load_prompt_set,
    resolve_prompt_sets,
    template_prompt_set,
    world_prompt_set,
)
from diffunlearn.worlds.digits import TEST_FILLERS, TRAIN_FILLERS

# --------------------------------------------------------------------------------------------
# Happy paths


def test_txt_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header comment\na cat\n\n   \n  a dog  \n# another\r\na bird\r\n", encoding="utf-8")
    ps = load_prompt_set(path)
    assert ps.name == "prompts"
    assert ps.prompts == ["a cat", "a dog", "a bird"]
    assert ps.seeds == [None] * 3 and ps.guidances == [None] * 3
    assert ps.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ps.source == str(path)


def test_json_strings_and_objects(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([
        "plain",
        {"prompt": "with seed", "seed": 7, "guidance": 5},
        {"prompt": "esd keys", "evaluation_seed": 12, "evaluation_guidance": 7.5, "case_number": 3},
        {"prompt": "defaults"},
        {"prompt": "null seed", "seed": None},
    ], indent=1), encoding="utf-8")
    ps = load_prompt_set(path, name="custom")
    assert ps.name == "custom"
    assert ps.prompts == ["plain", "with seed", "esd keys", "defaults", "null seed"]
    assert ps.seeds == [None, 7, 12, None, None]
    assert ps.guidances == [None, 5.0, 7.5, None, None]


def test_csv_i2p_layout(tmp_path):
    path = tmp_path / "i2p.csv"
    path.write_text(
        "case_number,prompt,evaluation_seed,evaluation_guidance,categories\n"
        '0,"a nude person, oil painting",2734971755,7,sexual\n'
        "1,a beach,42.0,,other\n"
        "\n"
        '2,"multi\nline prompt",,11.5,x\n',
        encoding="utf-8")
    ps = load_prompt_set(path)
    assert ps.name == "i2p"
    assert ps.prompts == ["a nude person, oil painting", "a beach", "multi\nline prompt"]
    assert ps.seeds == [2734971755, 42, None]
    assert ps.guidances == [7.0, None, 11.5]


def test_csv_without_seed_columns_and_with_bom(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,other\na cat,1\na dog,2\n")
    ps = load_prompt_set(path)
    assert ps.prompts == ["a cat", "a dog"] and ps.seeds == [None, None]


def test_prompt_set_lengths_must_match():
    with pytest.raises(ValueError):
        PromptSet("x", ["a"], [], [None], "src", "0" * 64)


# --------------------------------------------------------------------------------------------
# Bad files: the message names the file and the 1-based line


def error_for(path) -> str:
    with pytest.raises(UserError) as info:
        load_prompt_set(path)
    message = str(info.value)
    assert path.name in message
    return message


@pytest.mark.parametrize("suffix", [".txt", ".json", ".csv"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text("\n  \n", encoding="utf-8")
    message = error_for(path)
    assert "empty" in message and "line 1" in message


def test_only_comments_has_no_prompts(tmp_path):
    path = tmp_path / "comments.txt"
    path.write_text("# nothing\n\n# here\n", encoding="utf-8")
    assert "no prompts" in error_for(path)


def test_missing_prompt_column_lists_columns(tmp_path):
    path = tmp_path / "wrong.csv"
    path.write_text("case_number,text,evaluation_seed\n0,a cat,1\n", encoding="utf-8")
    message = error_for(path)
    assert "line 1" in message and "'prompt'" in message and "'text'" in message and "'evaluation_seed'" in message


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"ok\n\xff\xfe bad\n")
    message = error_for(path)
    assert "line 2" in message and "UTF-8" in message


def test_bad_seed_in_csv_names_the_line(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_text("prompt,evaluation_seed\na cat,1\na dog,abc\n", encoding="utf-8")
    message = error_for(path)
    assert "line 3" in message and "'abc'" in message


def test_bad_guidance_in_csv_names_the_line(tmp_path):
    path = tmp_path / "guidance.csv"
    path.write_text("prompt,evaluation_guidance\na cat,-1\n", encoding="utf-8")
    assert "line 2" in error_for(path)


def test_bad_seed_in_json_names_the_line(tmp_path):
    path = tmp_path / "seeds.json"
    path.write_text('[\n  "a cat",\n  {"prompt": "a dog",\n   "seed": -3}\n]\n', encoding="utf-8")
    assert "line 3" in error_for(path)


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  "a cat",\n  "a dog"\n  "a bird"\n]\n', encoding="utf-8")
    message = error_for(path)
    assert "line 4" in message and "column" in message


def test_json_object_without_prompt(tmp_path):
    path = tmp_path / "noprompt.json"
    path.write_text('["a", {"text": "b"}]', encoding="utf-8")
    message = error_for(path)
    assert "line 1" in message and '"prompt"' in message


def test_missing_file_and_unknown_extension(tmp_path):
    error_for(tmp_path / "absent.txt")
    path = tmp_path / "prompts.yaml"
    path.write_text("- a\n", encoding="utf-8")
    assert ".json, .txt or .csv" in error_for(path)


# --------------------------------------------------------------------------------------------
# Built-in sets and specs


def test_template_test_set_uses_held_out_vocabulary():
    template = TEMPLATES["nudity"]
    test_forget = template_prompt_set("nudity", "test", 100, "forget")
    test_remain = template_prompt_set("nudity", "test", 100, "remain")
    train_forget = template_prompt_set("nudity", "train", 200, "forget")
    assert len(test_forget) == len(test_remain) == 100 and len(train_forget) == 200
    assert test_forget.seeds == [None] * 100 and test_forget.guidances == [None] * 100
    assert len(test_forget.sha256) == 64
    test_text, train_text = " ".join(test_forget.prompts), " ".join(train_forget.prompts)
    for slot, words in template.test.items():
        for word in words:
            assert word not in train_text, (slot, word)
    for prompt in test_forget.prompts:
        assert not any(word in prompt for words in template.train.values() for word in words)
    assert all(any(w in p for w in template.words) for p in test_forget.prompts)
    assert not any(f" {w} " in p for p in test_remain.prompts for w in template.words)
    assert set(test_forget.prompts).isdisjoint(train_forget.prompts)
    assert "melancholic" in test_text or "hopeful" in test_text


def test_world_sets_use_disjoint_fillers():
    test_set = world_prompt_set("three", "test", 40, "forget")
    train_set = world_prompt_set("three", "train", 40, "forget")
    assert len(test_set) == len(train_set) == 40
    test_words = [w for ws in TEST_FILLERS.values() for w in ws]
    train_words = [w for ws in TRAIN_FILLERS.values() for w in ws]
    assert not any(w in p for p in test_set.prompts for w in train_words)
    assert not any(w in p for p in train_set.prompts for w in test_words)
    assert any(w in p for p in test_set.prompts for w in test_words)


def test_resolve_specs_and_names(tmp_path):
    path = tmp_path / "i2p.csv"
    path.write_text("prompt,evaluation_seed\na,1\nb,2\n", encoding="utf-8")
    sets = resolve_prompt_sets([
        "template:nudity:test:forget:10", "world:three:test:remain:5", str(path),
        "remain-train=template:nudity:train:remain:7",
    ])
    assert [s.name for s in sets] == ["forget", "remain", "i2p", "remain-train"]
    assert sets[2].seeds == [1, 2]
    by_source = {s.source: s for s in sets}
    assert len(by_source["template:nudity:test:forget:10"]) == 10
    assert len(by_source["world:three:test:remain:5"]) == 5
    assert len(by_source[str(path)]) == 2
    assert len(by_source["template:nudity:train:remain:7"]) == 7


def test_resolve_defaults_and_rename():
    sets = resolve_prompt_sets(["template:nudity", "test-remain=template:nudity::remain"])
    assert [s.name for s in sets] == ["forget", "test-remain"]
    assert [len(s) for s in sets] == [100, 100]
    assert resolve_prompt_sets([]) == []


def test_duplicate_names_are_rejected(tmp_path):
    with pytest.raises(UserError, match="both named 'forget'"):
        resolve_prompt_sets(["template:nudity:test:forget:5", "world:three:test:forget:5"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "i2p.txt").write_text("x\n", encoding="utf-8")
    with pytest.raises(UserError, match="both named 'i2p'"):
        resolve_prompt_sets([str(tmp_path / "a" / "i2p.txt"), str(tmp_path / "b" / "i2p.txt")])


@pytest.mark.parametrize("spec, fragment", [
    ("template:klimt", "unknown concept"),
    ("template:nudity:valid", "unknown split"),
    ("template:nudity:test:both", "unknown side"),
    ("template:nudity:test:forget:zero", "not an integer"),
    ("template:nudity:test:forget:0", "positive integer"),
    ("world:eleven", "unknown concept"),
    ("world:three:test:forget:5:extra", "malformed"),
    ("nonexistent.txt", "does not exist"),
])
def test_bad_specs(spec, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve_prompt_sets([spec])


def test_unterminated_csv_quote_names_the_row(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('prompt,evaluation_seed\na,1\n"unterminated,2\nc,3\n', encoding="utf-8")
    message = error_for(path)
    assert "line 3" in message and "quoting" in message
