"""Data that used to be accepted without a word: each is now a bad row (an error naming the row
and the fix, or skipped and counted with on_bad_row: skip), or an error naming the file and line.

Expected ids follow tests/test_data.py: the shipped tokenizer, BOS before the prompt, EOS after
each response.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from data_fixtures import write_jsonl

from pairopt.data.config import DataConfig
from pairopt.data.load import PreferenceData, load_preference_data
from pairopt.errors import PairoptError

GOOD = {"prompt": "Tell me about the lake.", "chosen": " The swans.", "rejected": " Nothing."}
USER = [{"role": "user", "content": "Hi"}]
CONV = {
    "prompt": USER,
    "chosen": [{"role": "assistant", "content": "Hello"}],
    "rejected": [{"role": "assistant", "content": "Go"}],
}


pytestmark = pytest.mark.usefixtures("quiet_datasets")


def load(path: Path, tok: Any, max_tokens: int | None = None, **kw: Any) -> PreferenceData:
    cfg = DataConfig(dataset=str(path), cache_dir=str(path.parent / "cache"), **kw)
    return load_preference_data(cfg, tok, max_tokens=max_tokens)


# (bad row, reason, what the message says, DataConfig settings)
CASES = {
    "whitespace_prompt": ({**GOOD, "prompt": " \n\t "}, "empty_prompt", "'prompt' is empty or only whitespace", {}),
    "empty_prompt": ({**GOOD, "prompt": ""}, "empty_prompt", "'prompt' is empty or only whitespace", {}),
    "whitespace_conv_prompt": (
        {**CONV, "prompt": [{"role": "user", "content": "  "}]}, "empty_prompt", "'prompt' is empty", {},
    ),
    "ends_with_user": (
        {**CONV, "rejected": [{"role": "assistant", "content": "Go"}, {"role": "user", "content": "?"}]},
        "response_not_assistant", "'rejected' ends with a 'user' message", {},
    ),
    "unknown_role": (
        {**CONV, "chosen": [{"role": "gpt", "content": "Hello"}]},
        "unknown_role", "message 0 has role 'gpt'; roles are system", {},
    ),
    "equal_after_truncation": (
        {**GOOD, "chosen": " The swans swim on it.", "rejected": " The swans fly over it."},
        "chosen_equals_rejected", "identical after truncation to 2 tokens", {"max_completion_length": 2},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_silently_accepted_rows_are_bad_rows(
    tmp_path: Path, tok: Any, case: str, mode: str
) -> None:
    bad, reason, detail, settings = CASES[case]
    good = CONV if isinstance(bad["prompt"], list) else GOOD
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad, good])
    if mode == "error":
        with pytest.raises(PairoptError) as err:
            load(path, tok, **settings)
        message = str(err.value)
        assert f"Row 1 of split 'train' of {path}" in message and f"[{reason}]" in message
        assert detail in message and "on_bad_row: skip" in message
    else:
        data = load(path, tok, on_bad_row="skip", **settings)
        assert len(data.train) == 2 and data.report.skipped == {reason: 1}
        assert f"1 bad rows skipped ({reason}: 1)" in str(data.report)


def test_a_response_longer_than_the_model_is_a_bad_row(tmp_path: Path, tok: Any) -> None:
    """A 200,000-character response (it hung step 1 before): refused at load time, naming the
    model's context and data.max_length; with data.max_length set it is cut instead."""
    huge = {**GOOD, "chosen": " swan" * 40_000}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, huge])
    with pytest.raises(PairoptError) as err:
        load(path, tok, max_tokens=512)
    message = str(err.value)
    assert "Row 1 of split 'train'" in message and "[too_long]" in message
    assert "more than the model's context of 512" in message and "set data.max_length" in message
    skipped = load(path, tok, max_tokens=512, on_bad_row="skip")
    assert skipped.report.skipped == {"too_long": 1} and len(skipped.train) == 1
    cut = load(path, tok, max_tokens=512, max_length=64)
    assert len(cut.train) == 2 and max(len(r) for r in cut.train["chosen_ids"]) <= 64


def test_unused_files_of_a_data_folder_are_listed(tmp_path: Path, tok: Any) -> None:
    folder = tmp_path / "prefs"
    folder.mkdir()
    for name in ("train.jsonl", "test.jsonl", "validation.jsonl"):
        write_jsonl(folder / name, [GOOD, GOOD])
    (folder / "notes.txt").write_text("how the pairs were made")
    (folder / ".hidden").write_text("")
    data = load_preference_data(DataConfig(dataset=str(folder), cache_dir=str(tmp_path / "c")), tok)
    assert data.report.unused_files == [
        "notes.txt (not read: another file type, or no split in its name)",
        "validation.jsonl (split 'validation': neither data.train_split nor data.eval_split)",
    ]
    assert "Not used: notes.txt" in str(data.report)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_data_file_that_is_not_utf8_names_the_line(tmp_path: Path, tok: Any, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_bytes(
            b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n'
        )
    else:
        path.write_bytes(b"prompt,chosen,rejected\na,b,c\ncaf\xe9,b,c\n")
    line = 2 if suffix == ".jsonl" else 3
    column = 16 if suffix == ".jsonl" else 4  # {"prompt": "caf is 15 bytes
    with pytest.raises(
        PairoptError, match=rf"{path} line {line}, column {column}: byte 0xe9 is not UTF-8"
    ):
        load(path, tok)


RANKED = {"prompt": "Tell me about the garden.", "responses": [" A.", " B."], "scores": [2, 1]}
RANKED_CONV = {
    "prompt": USER,
    "responses": [[{"role": "assistant", "content": "Hello"}], "Go"],
    "scores": [2, 1],
}
RANKED_CASES = {
    "whitespace_prompt": ({**RANKED, "prompt": "  "}, "empty_prompt", {}),
    "ends_with_user": (
        {**RANKED_CONV, "responses": [[{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "?"}], "Go"]},
        "response_not_assistant", {},
    ),
    "unknown_role": ({**RANKED_CONV, "prompt": [{"role": "human", "content": "Hi"}]}, "unknown_role", {}),
    "too_long": ({**RANKED, "responses": [" A.", " swan" * 300]}, "too_long", {"max_tokens": 64}),
}  # fmt: skip


@pytest.mark.parametrize("case", RANKED_CASES)
def test_ranked_rows_have_the_same_checks(tmp_path: Path, tok: Any, case: str) -> None:
    """Rows of k scored responses (the ranked format) are checked like pairs."""
    bad, reason, extra = RANKED_CASES[case]
    good = RANKED_CONV if isinstance(bad["prompt"], list) else RANKED
    path = write_jsonl(tmp_path / "r.jsonl", [good, bad])
    with pytest.raises(PairoptError, match=rf"Row 1 of split 'train'.*\[{reason}\]"):
        load(path, tok, **extra)
    data = load(path, tok, on_bad_row="skip", **extra)
    assert len(data.train) == 1 and data.report.skipped == {reason: 1}
