"""One dataset row -> checked, tokenised, truncated token ids.

`RowTokenizer` is the function `pairopt.data.load` gives to `Dataset.map(batched=True,
with_indices=True)`. It never drops a row itself: it writes the token ids and, per row, a
status ("" ok, "skip:<bad-row reason>", "drop:<truncation reason>") and truncation flags, so
the counts in the data report survive the `datasets` cache; `pairopt.data.load` filters afterwards.

- Texts: standard rows as they are; conversations through the chat template (the prompt with
  `add_generation_prompt=True`, a response is what the whole conversation renders after the
  rendered prompt); implicit rows split at the shared beginning (`split_common_prefix`).
- Ids: the prompt with the tokenizer's special tokens, BOS once even if the chat template wrote
  it; each response without special tokens, plus EOS unless its text already ends with EOS.
- Truncation, TRL semantics: the prompt to `max_prompt_length` (its end and leading BOS, or its
  start), then each response separately to `max_completion_length` and to
  `max_length - len(prompt)`; a row with no room left for a response is dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets

from pairopt.data.config import DataConfig
from pairopt.data.formats import DataFormat
from pairopt.errors import PairoptError

BAD_ROW_REASONS = {
    "wrong_type": "a value has the wrong type",
    "empty_response": "a response is empty",
    "chosen_equals_rejected": "chosen == rejected (as written, or after truncation)",
    "empty_prompt": "the prompt is empty or only whitespace, or has no tokens",
    "chat_template": "the chat template failed or did not render the prompt as a prefix of the conversation",
    "unknown_role": "a message has a role other than KNOWN_ROLES",
    "response_not_assistant": "a conversational response does not end with an assistant turn",
    "too_long": "prompt + response is longer than the model's context (with no data.max_length)",
}
# The roles chat templates know (OpenAI's and Hugging Face's conventions; ipython: Llama 3.1's
# tool results). Anything else is most often a converted dataset's "human"/"gpt"/"bot".
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
DROP_REASONS = {"no_room_for_response": "the prompt fills max_length, no room for a response"}
# Part of the map function's state, hence of the datasets cache key: datasets hashes a callable
# object by its pickled state and its class by name, so without this an edit to this file
# would keep serving results cached by the old code.
CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
STATUS_COLUMNS = ["_status", "_prompt_truncated", "_response_truncated", "_resplit"]
OUTPUT_FEATURES = datasets.Features(
    {
        "prompt_ids": datasets.List(datasets.Value("int32")),
        "chosen_ids": datasets.List(datasets.Value("int32")),
        "rejected_ids": datasets.List(datasets.Value("int32")),
        "_status": datasets.Value("string"),  # "" ok, "skip:<reason>" or "drop:<reason>"
        "_prompt_truncated": datasets.Value("bool"),
        "_response_truncated": datasets.Value("bool"),
        "_resplit": datasets.Value("bool"),  # the prompt/response boundary moved (see tokenize)
    }
)


class BadRow(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def check_text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise BadRow(
            "wrong_type", f"column {column!r} holds {type(value).__name__}, expected a string"
        )
    return value


def check_messages(value: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise BadRow(
            "wrong_type",
            f"column {column!r} holds {type(value).__name__}, expected a list of {{role, content}} messages",
        )
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRow(
                "wrong_type",
                f"column {column!r} message {i} is {type(message).__name__}, expected a dict",
            )
        if "role" not in message and {"from", "value"} <= message.keys():
            raise BadRow(
                "wrong_type",
                f"column {column!r} message {i} is ShareGPT-style {{from, value}}; pairopt reads "
                "{role, content} messages (as TRL does): convert the dataset first, e.g. "
                "from -> role (human -> user, gpt -> assistant) and value -> content",
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise BadRow(
                    "wrong_type",
                    f"column {column!r} message {i} has {key} of type "
                    f"{type(message.get(key)).__name__}, expected a string",
                )
        if message["role"] not in KNOWN_ROLES:
            raise BadRow(
                "unknown_role",
                f"column {column!r} message {i} has role {message['role']!r}; roles are "
                f"{', '.join(KNOWN_ROLES)} (rename it, e.g. human -> user, gpt -> assistant)",
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def check_assistant_end(messages: list[dict[str, str]], column: str) -> None:
    """A response is what the model says: its last message must be the assistant's."""
    if messages and messages[-1]["role"] != "assistant":
        raise BadRow(
            "response_not_assistant",
            f"column {column!r} ends with a {messages[-1]['role']!r} message; a response must "
            "end with an assistant turn (the model is trained on what it says)",
        )


def _is_empty(value: str | list[dict[str, str]]) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not any(m["content"].strip() for m in value)


def split_common_prefix(chosen: str, rejected: str) -> int:
    """Where the implicit prompt ends in two texts: their common prefix, never mid-word.

    TRL's `extract_prompt` cuts at the first differing character and moves one space before it
    into the responses. Cutting inside a word would also make the tokenizer see word fragments,
    so we back up to the word's start first (e.g. "... is blue" / "... is black" -> prompt
    "... is", responses " blue" / " black").
    """
    k, end = 0, min(len(chosen), len(rejected))
    while k < end and chosen[k] == rejected[k]:
        k += 1

    def inside_word(k: int) -> bool:
        if k == 0 or not chosen[k - 1].isalnum():
            return False
        return any(k < len(t) and t[k].isalnum() for t in (chosen, rejected))

    while inside_word(k):
        k -= 1
    if k > 0 and chosen[k - 1] == " ":
        k -= 1
    return k


class RowTokenizer:
    """The `Dataset.map(batched=True, with_indices=True)` function: columns in, token ids out.

    A plain class (not a closure) so it pickles for `num_proc` and hashes stably for the cache.
    """

    def __init__(
        self,
        tokenizer: Any,
        cfg: DataConfig,
        data_format: DataFormat,
        where: str,
        split: str,
        max_tokens: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.data_format = data_format
        self.where = where
        self.split = split
        self.max_tokens = max_tokens  # the model's context; checked only without data.max_length
        self.bos_id: int | None = tokenizer.bos_token_id
        self.eos_id: int = tokenizer.eos_token_id
        self.code_version = CODE_VERSION
        self.closes_turns = data_format.messages and self._template_closes_turns()

    # -- texts of one row ---------------------------------------------------------------------

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # jinja raise_exception() or a template bug: a per-row problem
            raise BadRow(
                "chat_template", f"the chat template failed: {type(err).__name__}: {err}"
            ) from err
        return str(text)

    def _continuation(
        self,
        prompt_text: str,
        prompt: list[dict[str, str]],
        response: list[dict[str, str]],
        column: str,
    ) -> str:
        full = self._render(prompt + response, generation_prompt=False)
        if not full.startswith(prompt_text):
            raise BadRow(
                "chat_template",
                f"the chat template renders prompt + {column} in a way that does not start with the "
                "rendered prompt, so the response cannot be cut out of it",
            )
        return full[len(prompt_text) :]

    def row_texts(self, batch: dict[str, list], i: int) -> tuple[str, str, str]:
        """(prompt, chosen, rejected) texts of row i of the batch, or raise BadRow."""
        cfg, data_format = self.cfg, self.data_format
        check = check_messages if data_format.messages else check_text
        chosen: Any = check(batch[cfg.chosen_column][i], cfg.chosen_column)
        rejected: Any = check(batch[cfg.rejected_column][i], cfg.rejected_column)
        prompt: Any = (
            None if data_format.implicit else check(batch[cfg.prompt_column][i], cfg.prompt_column)
        )
        if prompt is not None and _is_empty(prompt):  # implicit prompts: checked as token ids
            raise BadRow(
                "empty_prompt",
                f"column {cfg.prompt_column!r} is empty or only whitespace (nothing to respond to)",
            )
        if chosen == rejected:
            raise BadRow(
                "chosen_equals_rejected",
                "chosen and rejected are identical (no preference to learn)",
            )
        if data_format.implicit:
            if data_format.messages:
                k = 0
                while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
                    k += 1
            else:
                k = split_common_prefix(chosen, rejected)
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        for value, column in ((chosen, cfg.chosen_column), (rejected, cfg.rejected_column)):
            if _is_empty(value):
                after = (
                    " after taking the shared beginning as the prompt"
                    if data_format.implicit
                    else ""
                )
                raise BadRow("empty_response", f"column {column!r} is empty{after}")
            if data_format.messages:
                check_assistant_end(value, column)
        if not data_format.messages:
            return prompt, chosen, rejected
        prompt_text = self._render(prompt, generation_prompt=True)
        return (
            prompt_text,
            self._continuation(prompt_text, prompt, chosen, cfg.chosen_column),
            self._continuation(prompt_text, prompt, rejected, cfg.rejected_column),
        )

    def _template_closes_turns(self) -> bool:
        """Whether the chat template ends an assistant message with a special token (its end
        marker: EOS, <|im_end|>, <|eot_id|>, ...). If it does, a response keeps what the template
        renders; if not, EOS is appended, so the model learns to stop."""
        probe = "pairopt probe response"
        try:
            text = self._render(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                generation_prompt=False,
            )
        except BadRow:  # a template that refuses the probe: rows report their own failures
            return False
        after = text.rsplit(probe, 1)[-1]
        return any(token and token in after for token in self.tokenizer.all_special_tokens)

    # -- token ids ----------------------------------------------------------------------------

    def tokenize(
        self, prompts: list[str], chosens: list[str], rejecteds: list[str]
    ) -> list[tuple[list[int], list[int], list[int], bool]]:
        """(prompt, chosen, rejected) ids of each row, and whether its boundary moved.

        Tokenised as running text, as TRL does: the prompt alone, and prompt + response joined;
        the responses start where either joined text's ids depart from the prompt's. A prompt
        ending in whitespace ("... Answer: ") or a tokenizer that merges across the boundary then
        gives the tokens the model reads in running text, not a split it never produces; the
        prompt ids are shared by both responses. `moved`: the ids differ from tokenising prompt
        and responses apart (counted in the data report).

        Standard text takes the tokenizer's special tokens (its BOS); rendered conversations take
        none: the chat template writes what the model sees at inference.
        """
        special = not self.data_format.messages

        def ids(texts: list[str], add: bool = special) -> list[list[int]]:
            return self.tokenizer(texts, add_special_tokens=add, verbose=False)["input_ids"]

        alone = ids(prompts)
        with_chosen = ids([p + c for p, c in zip(prompts, chosens, strict=True)])
        with_rejected = ids([p + r for p, r in zip(prompts, rejecteds, strict=True)])
        apart_chosen, apart_rejected = ids(chosens, add=False), ids(rejecteds, add=False)
        rows = []
        for j, prompt in enumerate(alone):
            cut = min(_shared(prompt, with_chosen[j]), _shared(prompt, with_rejected[j]))
            p = self.prompt_ids(prompt[:cut], prompts[j])
            c = self.response_ids(with_chosen[j][cut:], chosens[j])
            r = self.response_ids(with_rejected[j][cut:], rejecteds[j])
            apart = (
                self.prompt_ids(prompt, prompts[j]),
                self.response_ids(apart_chosen[j], chosens[j]),
                self.response_ids(apart_rejected[j], rejecteds[j]),
            )
            rows.append((p, c, r, (p, c, r) != apart))
        return rows

    def prompt_ids(self, ids: list[int], text: str) -> list[int]:
        # A chat template that writes BOS itself, tokenised with special tokens, gives BOS twice.
        bos = self.tokenizer.bos_token
        if len(ids) >= 2 and ids[0] == ids[1] == self.bos_id and bos and text.startswith(bos):
            return ids[1:]
        return ids

    def response_ids(self, ids: list[int], text: str) -> list[int]:
        # A conversation's response keeps the template's end marker (see _template_closes_turns).
        # Else EOS is added when absent: not the last token, and the text does not end with EOS
        # (a template may close the turn with EOS and then write a newline; no second EOS then).
        if self.closes_turns:
            return ids
        eos = self.tokenizer.eos_token
        if (ids and ids[-1] == self.eos_id) or (eos and text.rstrip().endswith(eos)):
            return ids
        return [*ids, self.eos_id]

    def truncate(
        self, prompt: list[int], chosen: list[int], rejected: list[int]
    ) -> tuple[list[int], list[int], list[int], bool, bool, bool]:
        """TRL semantics; returns the ids, prompt_cut, response_cut, and whether to drop."""
        cfg = self.cfg
        prompt_cut = False
        if cfg.max_prompt_length is not None and len(prompt) > cfg.max_prompt_length:
            n, prompt_cut = cfg.max_prompt_length, True
            if cfg.prompt_truncation == "keep_start":
                prompt = prompt[:n]
            elif self.bos_id is not None and prompt[0] == self.bos_id:
                # keep_end would drop BOS, which many models need as the first token
                prompt = [prompt[0], *prompt[len(prompt) - n + 1 :]] if n > 1 else prompt[:1]
            else:
                prompt = prompt[-n:]
        limit = cfg.max_completion_length or len(chosen) + len(rejected)
        if cfg.max_length is not None:
            if len(prompt) >= cfg.max_length:
                return prompt, chosen, rejected, prompt_cut, False, True
            limit = min(limit, cfg.max_length - len(prompt))
        response_cut = len(chosen) > limit or len(rejected) > limit
        return prompt, chosen[:limit], rejected[:limit], prompt_cut, response_cut, False

    def check_ids(
        self, prompt: list[int], chosen: list[int], rejected: list[int], cut: bool
    ) -> None:
        """Raise BadRow for a pair whose token ids are identical (truncation can make them so:
        the loss then has nothing to learn), or one longer than the model's context (the engine
        places each response right after the prompt)."""
        cfg = self.cfg
        if chosen == rejected:
            how = (
                f"after truncation to {len(chosen)} tokens (they differ only in what was cut): "
                "raise data.max_completion_length / data.max_length"
                if cut
                else "as token ids (the texts tokenise the same)"
            )
            raise BadRow("chosen_equals_rejected", f"chosen and rejected are identical {how}")
        self.check_length(prompt, {cfg.chosen_column: chosen, cfg.rejected_column: rejected})

    def check_length(self, prompt: list[int], responses: dict[str, list[int]]) -> None:
        """Raise BadRow when prompt + the longest response exceeds the model's context (only
        without data.max_length, which cuts every response to fit)."""
        if self.cfg.max_length is not None or self.max_tokens is None:
            return
        column, response = max(responses.items(), key=lambda item: len(item[1]))
        longest = len(prompt) + len(response)
        if longest > self.max_tokens:
            raise BadRow(
                "too_long",
                f"prompt + {column} is {longest} tokens, more than the model's context of "
                f"{self.max_tokens} (max_position_embeddings in its config): set data.max_length "
                f"to at most {self.max_tokens} to cut such responses",
            )

    def fail(self, index: int, bad: BadRow) -> PairoptError:
        return PairoptError(
            f"Row {index} of split {self.split!r} of {self.where} ({self.data_format.name} format): "
            f"{bad.detail} [{bad.reason}]. Fix the row, or set on_bad_row: skip to skip such rows "
            "and count them in the data report."
        )

    def read_rows(
        self,
        batch: dict[str, list],
        indices: list[int],
        read: Callable[[dict[str, list], int], Any],
        id_columns: Sequence[str],
    ) -> tuple[dict[str, list], list[int], list[Any]]:
        """(output columns, rows read, their texts): empty ids in `id_columns` and clear status
        columns for every row, then `read(batch, i)` per row; a bad row fails the load
        (on_bad_row: error) or is marked skipped."""
        n = len(indices)
        out: dict[str, list] = {name: [[] for _ in range(n)] for name in id_columns}
        out["_status"] = [""] * n
        for flag in ("_prompt_truncated", "_response_truncated", "_resplit"):
            out[flag] = [False] * n
        good, texts = [], []
        for i, index in enumerate(indices):
            try:
                texts.append(read(batch, i))
                good.append(i)
            except BadRow as bad:
                if self.cfg.on_bad_row == "error":
                    raise self.fail(index, bad) from None
                out["_status"][i] = f"skip:{bad.reason}"
        return out, good, texts

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        columns = ("prompt_ids", "chosen_ids", "rejected_ids")
        out, good, texts = self.read_rows(batch, indices, self.row_texts, columns)
        if not good:
            return out
        prompts, chosens, rejecteds = (list(column) for column in zip(*texts, strict=True))
        for (p, c, r, moved), i in zip(
            self.tokenize(prompts, chosens, rejecteds), good, strict=True
        ):
            try:
                if not p:
                    raise BadRow(
                        "empty_prompt", "the prompt is empty and the tokenizer adds no BOS"
                    )
                p, c, r, prompt_cut, response_cut, drop = self.truncate(p, c, r)
                if not drop:
                    self.check_ids(p, c, r, response_cut)
            except BadRow as bad:
                if self.cfg.on_bad_row == "error":
                    raise self.fail(indices[i], bad) from None
                out["_status"][i] = f"skip:{bad.reason}"
                continue
            out["_resplit"][i] = moved
            if drop:
                out["_status"][i] = "drop:no_room_for_response"
                continue
            out["prompt_ids"][i], out["chosen_ids"][i], out["rejected_ids"][i] = p, c, r
            out["_prompt_truncated"][i], out["_response_truncated"][i] = prompt_cut, response_cut
        return out


def _shared(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
