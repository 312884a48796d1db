"""pairopt.data / pairopt.rows: formats, tokenisation policy, truncation, bad rows, cache, assets.

Every test reads files it writes into tmp_path (or the shipped assets) with a tmp datasets
cache; nothing touches the network. Expected ids are built by hand from the shipped tokenizer:
prompt = tok(prompt) (BOS first), response = tok(response, no special tokens) + [EOS].
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pydantic
import pytest
import torch
from data_fixtures import write_jsonl
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pairopt.data.config import DataConfig
from pairopt.data.load import PreferenceData, load_preference_data, rows_to_pairs
from pairopt.data.rows import RowTokenizer, split_common_prefix
from pairopt.errors import PairoptError
from pairopt.pairs import PreferencePair
from pairopt.sources import resolve_builtin

ROWS = [
    {
        "prompt": "Can you tell me about the garden?",
        "chosen": " Of course.",
        "rejected": " Whatever.",
    },
    {"prompt": "What is special about the lake?", "chosen": " The swans.", "rejected": " Nothing."},
    {"prompt": "Write a note about the cave.", "chosen": " It is dark.", "rejected": " No."},
]


pytestmark = pytest.mark.usefixtures("quiet_datasets")


def load(path: Path, tok: Any, **kw: Any) -> PreferenceData:
    cfg = DataConfig(dataset=str(path), cache_dir=str(path.parent / "cache"), **kw)
    return load_preference_data(cfg, tok)


def ids(tok: Any, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def expected_row(tok: Any, prompt: str, chosen: str, rejected: str) -> dict[str, list[int]]:
    eos = tok.eos_token_id
    return {
        "prompt_ids": ids(tok, prompt, special=True),
        "chosen_ids": [*ids(tok, chosen), eos],
        "rejected_ids": [*ids(tok, rejected), eos],
    }


# --- formats and file types ------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_standard_format_from_each_file_type(tmp_path: Path, tok: Any, suffix: str) -> None:
    path = tmp_path / f"prefs{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    data = load(path, tok)
    assert data.report.format == "standard"
    assert data.eval is None and "no split 'test'" in data.report.eval_source
    assert data.train[:] == {
        k: [expected_row(tok, **r)[k] for r in ROWS]
        for k in ("prompt_ids", "chosen_ids", "rejected_ids")
    }
    first = data.train[0]
    assert first["prompt_ids"][0] == tok.bos_token_id
    assert first["prompt_ids"].count(tok.bos_token_id) == 1


def test_folder_splits_and_custom_columns(tmp_path: Path, tok: Any) -> None:
    folder = tmp_path / "prefs"
    folder.mkdir()
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    write_jsonl(folder / "train.jsonl", renamed)
    write_jsonl(folder / "test.jsonl", renamed[:1])
    data = load(folder, tok, prompt_column="question", chosen_column="good", rejected_column="bad")
    assert (len(data.train), len(data.eval or [])) == (3, 1)
    assert data.eval is not None and data.eval[0] == expected_row(tok, **ROWS[0])
    assert [s.name for s in data.report.splits] == ["train", "eval"]


def test_eval_fraction_holds_out_part_of_train_seeded(tmp_path: Path, tok: Any) -> None:
    rows = [{"prompt": f"Tell me about the {w}?", "chosen": " Sure.", "rejected": " No."} for w in
            ["garden", "lake", "cave", "farm", "zoo", "park", "city", "river"]]  # fmt: skip
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    a = load(path, tok, eval_fraction=0.25)
    b = load(path, tok, eval_fraction=0.25)
    assert a.eval is not None and b.eval is not None
    assert (len(a.train), len(a.eval)) == (6, 2)
    assert a.eval["prompt_ids"] == b.eval["prompt_ids"]  # same seed, same held-out pairs
    assert not set(map(tuple, a.eval["prompt_ids"])) & set(map(tuple, a.train["prompt_ids"]))
    assert "held out from train" in a.report.eval_source
    with pytest.raises(PairoptError, match=r"eval_fraction=0.99 of the 8 usable .* leave none"):
        load(path, tok, eval_fraction=0.99)


def test_missing_eval_split_names_the_splits_there(tmp_path: Path, tok: Any) -> None:
    folder = tmp_path / "prefs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    write_jsonl(folder / "validation.jsonl", ROWS[:1])
    data = load(folder, tok)
    assert data.eval is None
    assert "no split 'test'; splits present: train, validation" in data.report.eval_source
    assert "--data.eval_split validation" in data.report.eval_source


def test_empty_and_malformed_files_say_what_is_wrong(tmp_path: Path, tok: Any) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(PairoptError, match=r"empty.jsonl: the file is empty"):
        load(empty, tok)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(PairoptError, match=r"Check that it is valid JSONL"):
        load(broken, tok)


def test_conversational_uses_chat_template_one_bos_one_eos(tmp_path: Path, tok: Any) -> None:
    """Template: '<s><|user|>\\nhi\\n<|assistant|>\\n' + content + '</s>'.

    The template writes BOS and the tokenizer adds one: the prompt must keep a single BOS. The
    template ends the assistant turn with EOS: no second EOS is appended.
    """
    user = [{"role": "user", "content": "Tell me about the garden."}]
    row = {
        "prompt": user,
        "chosen": [{"role": "assistant", "content": "It is green."}],
        "rejected": [{"role": "assistant", "content": "Whatever."}],
    }
    data = load(write_jsonl(tmp_path / "c.jsonl", [row]), tok)
    assert data.report.format == "conversational"
    got = data.train[0]
    prompt_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert prompt_text.startswith("<s><|user|>")
    assert got["prompt_ids"] == ids(tok, prompt_text)  # the template's BOS, not a second one
    assert got["chosen_ids"] == ids(tok, "It is green.</s>")
    assert (
        got["chosen_ids"].count(tok.eos_token_id) == 1 and got["chosen_ids"][-1] == tok.eos_token_id
    )
    assert tok.decode(got["prompt_ids"] + got["rejected_ids"]) == tok.apply_chat_template(
        user + row["rejected"], tokenize=False
    )


def test_prompt_and_response_are_tokenised_as_running_text(tmp_path: Path, tok: Any) -> None:
    """D1: a prompt ending in a space. Apart, "... Answer: " ends in a lone 'Ġ' token and the
    response starts "the" without its space, a split the tokenizer never makes in running
    text; joined, the boundary moves before that space: the prompt ends at ':' and the
    responses start with 'Ġthe', exactly the ids of " the knives." (as TRL tokenises)."""
    rows = [
        {"prompt": "What is in the kitchen? Answer: ", "chosen": "the knives.", "rejected": "no."},
        {"prompt": "What is in the lake?", "chosen": " The swans.", "rejected": " Nothing."},
    ]
    data = load(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    first, second = data.train[0], data.train[1]
    assert ids(tok, "What is in the kitchen? Answer: ", special=True)[-1] == ids(tok, " ")[0]
    assert first["prompt_ids"] == ids(tok, "What is in the kitchen? Answer:", special=True)
    assert first["chosen_ids"] == [*ids(tok, " the knives."), tok.eos_token_id]
    assert first["rejected_ids"] == [*ids(tok, " no."), tok.eos_token_id]
    assert second == expected_row(tok, **rows[1])  # nothing to move: the same ids as apart
    assert data.report.splits[0].resplit == 1
    assert "1 re-split" in str(data.report)


def _with_template(tok: Any, template: str, *special: str) -> Any:
    other = copy.deepcopy(tok)
    if special:
        other.add_special_tokens({"additional_special_tokens": list(special)})
    other.chat_template = template
    return other


CONVERSATION = {
    "prompt": [{"role": "user", "content": "Tell me about the garden."}],
    "chosen": [{"role": "assistant", "content": "It is green."}],
    "rejected": [{"role": "assistant", "content": "Whatever."}],
}


def test_conversations_follow_the_template_bos_and_end_marker(tmp_path: Path, tok: Any) -> None:
    """D2: what the template renders is what the model sees. A template that writes no BOS
    gets none added; one that writes no end marker after an assistant message gets EOS; one
    that closes the turn with its own special token keeps it and gets no EOS."""
    bare = _with_template(
        tok,
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}",
    )
    got = load(write_jsonl(tmp_path / "a.jsonl", [CONVERSATION]), bare).train[0]
    assert got["prompt_ids"] == ids(bare, "user: Tell me about the garden.\nassistant:")
    assert tok.bos_token_id not in got["prompt_ids"]
    assert got["chosen_ids"] == [*ids(bare, " It is green.\n"), tok.eos_token_id]
    marked = _with_template(
        tok,
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
        "<|end|>",
    )
    got = load(write_jsonl(tmp_path / "b.jsonl", [CONVERSATION]), marked).train[0]
    end = marked.convert_tokens_to_ids("<|end|>")
    assert got["chosen_ids"][-1] == end and tok.eos_token_id not in got["chosen_ids"]
    assert marked.decode(got["prompt_ids"] + got["chosen_ids"]) == marked.apply_chat_template(
        CONVERSATION["prompt"] + CONVERSATION["chosen"], tokenize=False
    )


def test_implicit_messages_equal_explicit_conversational(tmp_path: Path, tok: Any) -> None:
    user = [{"role": "user", "content": "Name a colour."}]
    good, bad = (
        [{"role": "assistant", "content": "Blue."}],
        [{"role": "assistant", "content": "Cat."}],
    )
    explicit = load(
        write_jsonl(tmp_path / "e.jsonl", [{"prompt": user, "chosen": good, "rejected": bad}]), tok
    )
    implicit = load(
        write_jsonl(tmp_path / "i.jsonl", [{"chosen": user + good, "rejected": user + bad}]), tok
    )
    assert implicit.report.format.startswith("implicit (messages), because there is no 'prompt'")
    assert implicit.train[:] == explicit.train[:]


def test_implicit_text_prompt_is_the_shared_prefix(tmp_path: Path, tok: Any) -> None:
    row = {"chosen": "The sky is blue.", "rejected": "The sky is black."}
    data = load(write_jsonl(tmp_path / "i.jsonl", [row]), tok)
    assert data.report.format.startswith("implicit (text), because there is no 'prompt' column")
    assert "set data.prompt_column" in data.report.format
    assert data.train[0] == expected_row(tok, "The sky is", " blue.", " black.")


@pytest.mark.parametrize(
    ("chosen", "rejected", "prompt"),
    [
        (
            "The sky is blue.",
            "The sky is black.",
            "The sky is",
        ),  # back to the word start, space moves
        ("Answer: yes", "Answer: no", "Answer:"),
        ("A:blue", "A:black", "A:"),  # no space: cut before the word
        ("x = 12", "x = 13", "x ="),  # digits are word characters too
        ("Same start. Then A.", "Same start. Then B.", "Same start. Then"),
        ("abc", "xyz", ""),
    ],
)
def test_split_common_prefix(chosen: str, rejected: str, prompt: str) -> None:
    k = split_common_prefix(chosen, rejected)
    assert chosen[:k] == rejected[:k] == prompt


def test_format_can_be_forced(tmp_path: Path, tok: Any) -> None:
    """format=implicit ignores a prompt column; format=conversational rejects strings per row."""
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "ignored", "chosen": "Hi there", "rejected": "Hi you"}]
    )
    data = load(path, tok, format="implicit")
    assert data.train[0] == expected_row(tok, "Hi", " there", " you")
    with pytest.raises(PairoptError, match=r"Row 0 .*column 'chosen' holds str, expected a list"):
        load(path, tok, format="conversational")


# --- truncation --------------------------------------------------------------------------------

SHORT = {"prompt": "Tell me.", "chosen": " Sure.", "rejected": " No."}
LONG = {
    "prompt": "I visited the garden last summer. The roses were fresh. Tell me about the garden?",
    "chosen": " Of course. The garden is green and full of roses. I hope this helps.",
    "rejected": " Whatever.",
}


@pytest.mark.parametrize("side", ["keep_end", "keep_start"])
def test_prompt_truncation_keeps_end_or_start(tmp_path: Path, tok: Any, side: str) -> None:
    """max_prompt_length=8: keep_end keeps BOS + the last 7 prompt tokens, keep_start the first 8."""
    full = ids(tok, LONG["prompt"], special=True)
    assert len(full) > 8
    data = load(
        write_jsonl(tmp_path / "t.jsonl", [LONG, SHORT]),
        tok,
        max_prompt_length=8,
        prompt_truncation=side,
    )
    got = data.train[0]["prompt_ids"]
    assert got == ([full[0], *full[-7:]] if side == "keep_end" else full[:8])
    assert data.train[1] == expected_row(tok, **SHORT)  # short enough: untouched
    split = data.report.splits[0]
    assert (split.prompts_truncated, split.responses_truncated, split.truncated) == (1, 0, 1)


def test_max_length_cuts_each_response_and_drops_rows_without_room(
    tmp_path: Path, tok: Any
) -> None:
    """max_length=24: a prompt of P tokens leaves 24 - P per response; each branch is cut separately."""
    exp = expected_row(tok, **LONG)
    p = len(exp["prompt_ids"])
    assert p < 24 < p + len(exp["chosen_ids"]) and p + len(exp["rejected_ids"]) <= 24
    too_long = {**ROWS[0], "prompt": LONG["prompt"] + " " + LONG["prompt"]}
    data = load(write_jsonl(tmp_path / "t.jsonl", [LONG, too_long, ROWS[1]]), tok, max_length=24)
    got = data.train[0]
    assert got["chosen_ids"] == exp["chosen_ids"][: 24 - p]  # cut, EOS lost (as in TRL)
    assert got["rejected_ids"] == exp["rejected_ids"]  # fits: untouched, ends with EOS
    split = data.report.splits[0]
    assert (split.rows_read, split.rows_kept, split.responses_truncated) == (3, 2, 1)
    assert split.dropped == {"no_room_for_response": 1} and split.skipped == {}
    assert "1 dropped (no_room_for_response: 1)" in str(data.report)


def test_max_completion_length(tmp_path: Path, tok: Any) -> None:
    data = load(write_jsonl(tmp_path / "t.jsonl", [LONG]), tok, max_completion_length=3)
    exp = expected_row(tok, **LONG)
    assert data.train[0]["chosen_ids"] == exp["chosen_ids"][:3]
    assert data.train[0]["rejected_ids"] == exp["rejected_ids"][:3]


# --- bad rows -----------------------------------------------------------------------------------

USER = [{"role": "user", "content": "Hi"}]
BAD_ROWS = {
    "null_value": ({"prompt": "p", "chosen": None, "rejected": " r"}, "wrong_type", "holds NoneType"),
    "number": ({"prompt": "p", "chosen": 3, "rejected": " r"}, "wrong_type", "holds int"),
    "empty_response": ({"prompt": "p", "chosen": " c", "rejected": "  "}, "empty_response", "'rejected' is empty"),
    "chosen_equals_rejected": ({"prompt": "p", "chosen": " same", "rejected": " same"}, "chosen_equals_rejected", "identical"),
}  # fmt: skip
CONV_OK = {"prompt": USER, "chosen": [{"role": "assistant", "content": "Hello"}],
           "rejected": [{"role": "assistant", "content": "Go"}]}  # fmt: skip
BAD_CONV_ROWS = {
    "no_content": ({**CONV_OK, "chosen": [{"role": "assistant"}]}, "wrong_type", "message 0 has content of type NoneType"),
    "no_messages": ({**CONV_OK, "rejected": []}, "empty_response", "'rejected' is empty"),
    "sharegpt": ({**CONV_OK, "chosen": [{"from": "gpt", "value": "Hello"}]}, "wrong_type", "ShareGPT-style"),
}  # fmt: skip


@pytest.mark.parametrize("case", [*BAD_ROWS, *BAD_CONV_ROWS])
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_bad_row_fails_with_index_or_is_skipped_and_counted(
    tmp_path: Path, tok: Any, case: str, mode: str
) -> None:
    bad, reason, detail = {**BAD_ROWS, **BAD_CONV_ROWS}[case]
    good = CONV_OK if case in BAD_CONV_ROWS else ROWS[0]
    path = write_jsonl(tmp_path / "b.jsonl", [good, good, bad, good])
    if mode == "error":
        with pytest.raises(PairoptError) as err:
            load(path, tok, on_bad_row="error")
        message = str(err.value)
        assert f"Row 2 of split 'train' of {path}" in message
        assert detail in message and f"[{reason}]" in message and "on_bad_row: skip" in message
    else:
        data = load(path, tok, on_bad_row="skip")
        assert len(data.train) == 3
        assert data.report.skipped == {reason: 1}
        assert f"1 bad rows skipped ({reason}: 1)" in str(data.report)


def test_implicit_prefix_only_response_is_empty(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "i.jsonl", [{"chosen": "Yes it is", "rejected": "Yes"}])
    with pytest.raises(
        PairoptError, match=r"Row 0 .*'rejected' is empty after taking the shared beginning"
    ):
        load(path, tok)


def test_chat_template_mismatch_is_a_bad_row(tmp_path: Path, tok: Any) -> None:
    """A template whose generation prompt differs from how it renders the assistant turn."""
    odd = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    odd.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]\n{% endif %}"
    )
    path = write_jsonl(tmp_path / "c.jsonl", [CONV_OK])
    with pytest.raises(
        PairoptError, match=r"does not start with the rendered prompt.*\[chat_template\]"
    ):
        load(path, odd)
    with pytest.raises(PairoptError, match=r"No usable training pairs.*chat_template: 1"):
        load(path, odd, on_bad_row="skip")


def test_empty_prompt_without_bos_is_a_bad_row(tmp_path: Path, tok: Any) -> None:
    """Implicit rows with nothing in common have an empty prompt; without BOS it has no tokens."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # adds nothing
    no_bos = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")
    rows = [{"chosen": "yes", "rejected": "no"}, {"chosen": "It is yes", "rejected": "It is no"}]
    data = load(write_jsonl(tmp_path / "i.jsonl", rows), no_bos, on_bad_row="skip")
    assert data.report.skipped == {"empty_prompt": 1}
    assert data.train[0]["prompt_ids"] == ids(no_bos, "It is")
    assert load(write_jsonl(tmp_path / "j.jsonl", rows), tok).train[0]["prompt_ids"] == [
        tok.bos_token_id
    ]


# --- user errors ----------------------------------------------------------------------------------


def test_missing_path_unknown_type_and_missing_columns(tmp_path: Path, tok: Any) -> None:
    with pytest.raises(PairoptError, match=r"'nope/prefs.jsonl' does not exist"):
        load_preference_data(DataConfig(dataset="nope/prefs.jsonl"), tok)
    txt = tmp_path / "prefs.txt"
    txt.write_text("hello")
    with pytest.raises(
        PairoptError, match=r"unknown file type '\.txt'. Supported: \.json, \.jsonl"
    ):
        load(txt, tok)
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "good": " a", "rejected": " b"}])
    with pytest.raises(PairoptError) as err:
        load(path, tok)
    assert str(err.value) == (
        f"Split 'train' of {path} has no column 'chosen' (columns present: prompt, good, "
        "rejected). Set chosen_column to the column that holds it."
    )
    with pytest.raises(PairoptError, match=r"no split 'dev'.*Set train_split"):
        load(path, tok, train_split="dev")


def test_column_of_wrong_type_and_tokenizer_without_template_or_eos(
    tmp_path: Path, tok: Any
) -> None:
    nums = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "p", "chosen": 1, "rejected": 2}])
    with pytest.raises(
        PairoptError, match="column 'chosen' holds int; expected a string or a list"
    ):
        load(nums, tok)
    plain = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    plain.chat_template = None
    with pytest.raises(PairoptError, match="has no chat template"):
        load(write_jsonl(tmp_path / "c.jsonl", [CONV_OK]), plain)
    plain.eos_token = None
    with pytest.raises(PairoptError, match="no EOS token"):
        load(write_jsonl(tmp_path / "s.jsonl", ROWS), plain)


def test_config_is_strict() -> None:
    with pytest.raises(pydantic.ValidationError, match="extra"):
        DataConfig(datset="x")  # type: ignore[call-arg]
    with pytest.raises(
        pydantic.ValidationError, match=r"max_prompt_length .* must be < max_length"
    ):
        DataConfig(max_length=64, max_prompt_length=64)
    with pytest.raises(pydantic.ValidationError, match="greater than or equal to 0"):
        DataConfig(eval_fraction=-0.1)
    with pytest.raises(pydantic.ValidationError, match="columns must differ"):
        DataConfig(chosen_column="prompt")
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        DataConfig().max_length = 3  # type: ignore[misc]
    assert all(f.description for f in DataConfig.model_fields.values())


# --- cache ------------------------------------------------------------------------------------


def test_second_load_is_served_from_the_datasets_cache(
    tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh tokenizer instance (a new process, in effect) must hit the cache: no row is re-tokenised."""
    calls = []
    original = RowTokenizer.__call__

    def counting(self: RowTokenizer, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        calls.append(len(indices))
        return original(self, batch, indices)

    monkeypatch.setattr(RowTokenizer, "__call__", counting)
    path = write_jsonl(tmp_path / "p.jsonl", [*ROWS, {**ROWS[0], "rejected": " "}])
    first = load(path, tok, on_bad_row="skip", max_length=12)
    assert sum(calls) == 4 and first.train.cache_files
    calls.clear()
    fresh = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    second = load(path, fresh, on_bad_row="skip", max_length=12)
    assert calls == []
    assert second.train._fingerprint == first.train._fingerprint
    assert second.train[:] == first.train[:]
    assert str(second.report) == str(first.report)  # counts survive the cache
    load(path, fresh, on_bad_row="skip", max_length=13)  # another setting: recomputed
    assert sum(calls) == 4


def test_num_proc_gives_the_same_result(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", ROWS * 4)
    assert load(path, tok, num_proc=2).train[:] == load(path, tok).train[:]


# --- shipped assets -----------------------------------------------------------------------------


def test_builtin_names() -> None:
    assert Path(resolve_builtin("builtin:tiny-prefs"), "train.jsonl").is_file()
    assert resolve_builtin("my/local.jsonl") == "my/local.jsonl"
    with pytest.raises(PairoptError, match="Available: builtin:tiny-llama, builtin:tiny-prefs"):
        resolve_builtin("builtin:huge-llama")


def test_shipped_model_config_and_tokenizer(tok: Any) -> None:
    path = resolve_builtin("builtin:tiny-llama")
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.vocab_size >= len(tok)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)  # fmt: skip
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert not list(Path(path).glob("*.safetensors"))  # weights are built from the config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    prompt = ids(tok, "Tell me about the garden.", special=True)
    assert model(torch.tensor([prompt])).logits.shape == (1, len(prompt), config.vocab_size)
    # every word of the dataset is a single token; unknown text still round-trips (byte-level)
    assert len(ids(tok, " cactus")) == len(ids(tok, " whales")) == 1
    assert tok.decode(ids(tok, "Grüße, 世界!")) == "Grüße, 世界!"


def test_default_config_loads_the_shipped_dataset_per_policy(tmp_path: Path, tok: Any) -> None:
    data = load_preference_data(DataConfig(cache_dir=str(tmp_path)), tok)
    assert data.eval is not None and (len(data.train), len(data.eval)) == (3000, 300)
    assert (data.report.rows_kept, data.report.truncated, data.report.skipped) == (3300, 0, {})
    bos, eos = tok.bos_token_id, tok.eos_token_id
    batch = data.train[:]
    for p, c, r in zip(
        batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], strict=True
    ):
        assert p[0] == bos and p.count(bos) == 1 and eos not in p
        for response in (c, r):
            assert response[-1] == eos and response.count(eos) == 1 and bos not in response
    assert max(map(len, batch["prompt_ids"])) <= 128  # prompts up to ~120 tokens (README)
    pairs = rows_to_pairs(data.train[:2])
    assert pairs[0] == PreferencePair(
        batch["prompt_ids"][0], batch["chosen_ids"][0], batch["rejected_ids"][0]
    )
    shipped = Path(resolve_builtin("builtin:tiny-prefs"))
    train_prompts, test_prompts = (
        {json.loads(line)["prompt"] for line in (shipped / name).read_text().splitlines()}
        for name in ("train.jsonl", "test.jsonl")
    )
    assert not test_prompts & train_prompts  # held-out pairs are new prompts


def test_rows_to_pairs_keeps_order_and_shares_the_prompt() -> None:
    rows = {
        "prompt_ids": [[1, 5], [1, 6]],
        "chosen_ids": [[7, 2], [8, 2]],
        "rejected_ids": [[9, 2], [2]],
    }
    assert rows_to_pairs(rows) == [
        PreferencePair([1, 5], [7, 2], [9, 2]),
        PreferencePair([1, 6], [8, 2], [2]),
    ]
    with pytest.raises(ValueError):
        rows_to_pairs({**rows, "rejected_ids": [[2]]})


def test_no_usable_rows_is_reported_as_such_with_eval_fraction(tmp_path: Path, tok: Any) -> None:
    """All rows bad and skipped: the error is about the data, not about eval_fraction."""
    rows = [{"prompt": "p", "chosen": " same", "rejected": " same"}] * 4
    path = write_jsonl(tmp_path / "same.jsonl", rows)
    with pytest.raises(PairoptError, match="No usable training pairs"):
        load(path, tok, eval_fraction=0.25, on_bad_row="skip")
