"""One ranked row (a prompt, k responses, k scores) -> checked, tokenised, truncated token ids.

The ranked twin of `pairopt.data.rows.RowTokenizer`, with the same rules: texts as they are,
or conversations through the chat template (the prompt with `add_generation_prompt=True`, a
response is what prompt + response renders after the rendered prompt; a response given as a
string under a conversational prompt is one assistant message); tokenised as running text
(the responses start where the ids of prompt + response depart from the prompt's, the earliest
over the k responses, so all share one prompt; `RowTokenizer.tokenize`), EOS as there; the
prompt truncated first, then every response to `max_completion_length` and to
`max_length - len(prompt)`. Like `RowTokenizer` it never drops a row itself: it writes a status
per row, and `pairopt.data.load` filters and counts.

Where the responses and scores are (`DataConfig`):

    responses_column  a list of k responses: strings, message lists, or objects (dicts) whose
                      `response_key` holds the response
    scores_column     a list of k numbers, read unless `score_key` names a key of the objects
    score_order       lower_is_better (ranks, 1 = best) is negated here, so every later step
                      reads "higher is better"

The common shapes: on-policy data (`all_generated_responses`, `all_rm_scores`) by column names;
UltraFeedback (`completions[*].response`, `completions[*].overall_score`) and Nectar
(`answers[*].answer`, `answers[*].rank`, lower is better) with the keys (docs/configuration.md,
Data). A row needs at least two responses and one finite score per response.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import datasets

from pairopt.data.rows import (
    BadRow,
    RowTokenizer,
    check_assistant_end,
    check_messages,
    check_text,
)

RANKED_BAD_ROW_REASONS = {
    "too_few_responses": "fewer than two responses",
    "bad_score": "a score is missing, not a number, or not finite",
}
RANKED_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
RANKED_FEATURES = datasets.Features(
    {
        "prompt_ids": datasets.List(datasets.Value("int32")),
        "responses_ids": datasets.List(datasets.List(datasets.Value("int32"))),
        "scores": datasets.List(datasets.Value("float64")),  # higher is better
        "_status": datasets.Value("string"),
        "_prompt_truncated": datasets.Value("bool"),
        "_response_truncated": datasets.Value("bool"),
        "_resplit": datasets.Value("bool"),  # the prompt/response boundary moved
    }
)

Texts = tuple[str, list[str], list[float]]


class RankedRowTokenizer(RowTokenizer):
    """The `Dataset.map(batched=True, with_indices=True)` function for ranked rows."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.ranked_code_version = RANKED_CODE_VERSION  # part of the datasets cache key

    # -- values of one row --------------------------------------------------------------------

    def _response(self, item: Any, j: int) -> Any:
        cfg, column = self.cfg, f"{self.cfg.responses_column}[{j}]"
        if cfg.response_key is not None:
            if not isinstance(item, dict) or cfg.response_key not in item:
                raise BadRow(
                    "wrong_type",
                    f"{column} is {type(item).__name__}, expected an object with the key "
                    f"{cfg.response_key!r} (response_key)",
                )
            item = item[cfg.response_key]
            column += f"[{cfg.response_key!r}]"
        if self.data_format.messages:
            if isinstance(item, str):  # the assistant's reply to a conversational prompt
                item = [{"role": "assistant", "content": item}]
            return check_messages(item, column)
        return check_text(item, column)

    def _scores(self, batch: dict[str, list], i: int, items: list[Any]) -> list[float]:
        cfg = self.cfg
        if cfg.score_key is not None:
            raw = [item.get(cfg.score_key) if isinstance(item, dict) else None for item in items]
            where = f"{cfg.responses_column}[*][{cfg.score_key!r}] (score_key)"
        else:
            raw = batch[cfg.scores_column][i]
            where = f"column {cfg.scores_column!r}"
            if not isinstance(raw, list) or len(raw) != len(items):
                got = f"{len(raw)} values" if isinstance(raw, list) else type(raw).__name__
                raise BadRow(
                    "bad_score", f"{where} holds {got} for {len(items)} responses; give one each"
                )
        scores = []
        value: Any
        for j, value in enumerate(raw):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not math.isfinite(value):
                raise BadRow("bad_score", f"{where}: score {j} is {value!r}, not a finite number")
            scores.append(float(value) if cfg.score_order == "higher_is_better" else -float(value))
        return scores

    def ranked_texts(self, batch: dict[str, list], i: int) -> Texts:
        """(prompt, responses, scores) of row i, texts rendered; or raise BadRow."""
        cfg = self.cfg
        items = batch[cfg.responses_column][i]
        if not isinstance(items, list):
            raise BadRow(
                "wrong_type",
                f"column {cfg.responses_column!r} holds {type(items).__name__}, expected a list",
            )
        if len(items) < 2:
            raise BadRow(
                "too_few_responses",
                f"column {cfg.responses_column!r} holds {len(items)} response(s); a ranking needs 2",
            )
        check = check_messages if self.data_format.messages else check_text
        prompt: Any = check(batch[cfg.prompt_column][i], cfg.prompt_column)
        if _is_empty(prompt):
            raise BadRow(
                "empty_prompt",
                f"column {cfg.prompt_column!r} is empty or only whitespace (nothing to respond to)",
            )
        responses = [self._response(item, j) for j, item in enumerate(items)]
        scores = self._scores(batch, i, items)
        for j, value in enumerate(responses):
            if _is_empty(value):
                raise BadRow("empty_response", f"{cfg.responses_column}[{j}] is empty")
            if self.data_format.messages:
                check_assistant_end(value, f"{cfg.responses_column}[{j}]")
        if not self.data_format.messages:
            return prompt, responses, scores
        prompt_text = self._render(prompt, generation_prompt=True)
        return (
            prompt_text,
            [
                self._continuation(prompt_text, prompt, r, f"{cfg.responses_column}[{j}]")
                for j, r in enumerate(responses)
            ],
            scores,
        )

    # -- token ids ----------------------------------------------------------------------------

    def tokenize_group(
        self, prompts: list[str], responses: list[list[str]]
    ) -> list[tuple[list[int], list[list[int]], bool]]:
        """(prompt, responses) ids of each row and whether its boundary moved: the running-text
        rule of `RowTokenizer.tokenize` for k responses (one cut for all of them)."""
        special = not self.data_format.messages

        def ids(texts: list[str], add: bool = special) -> list[list[int]]:
            return self.tokenizer(texts, add_special_tokens=add, verbose=False)["input_ids"]

        alone = ids(prompts)
        joined = ids([p + r for p, rs in zip(prompts, responses, strict=True) for r in rs])
        apart = ids([r for rs in responses for r in rs], add=False)
        rows, start = [], 0
        for prompt, text, texts in zip(alone, prompts, responses, strict=True):
            mine = range(start, start + len(texts))
            start += len(texts)
            cut = min(_shared(prompt, joined[m]) for m in mine)
            p = self.prompt_ids(prompt[:cut], text)
            rs = [self.response_ids(joined[m][cut:], t) for m, t in zip(mine, texts, strict=True)]
            separate = [self.response_ids(apart[m], t) for m, t in zip(mine, texts, strict=True)]
            rows.append((p, rs, (p, rs) != (self.prompt_ids(prompt, text), separate)))
        return rows

    def truncate_group(
        self, prompt: list[int], responses: list[list[int]]
    ) -> tuple[list[int], list[list[int]], bool, bool, bool]:
        """The pairwise rules for k responses: (prompt, responses, prompt_cut, response_cut, drop)."""
        prompt, _, _, prompt_cut, _, drop = self.truncate(prompt, [], [])  # the prompt's rules
        if drop:
            return prompt, responses, prompt_cut, False, True
        limit = self.cfg.max_completion_length or max(len(r) for r in responses)
        if self.cfg.max_length is not None:
            limit = min(limit, self.cfg.max_length - len(prompt))
        response_cut = any(len(r) > limit for r in responses)
        return prompt, [r[:limit] for r in responses], prompt_cut, response_cut, False

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out, good, texts = self.read_rows(batch, indices, self.ranked_texts, RANKED_FEATURES)
        if not good:
            return out
        tokenised = self.tokenize_group([t[0] for t in texts], [t[1] for t in texts])
        column = self.cfg.responses_column
        for (p, ids, moved), i, (_, _, scores) in zip(tokenised, good, texts, strict=True):
            try:
                if not p:
                    raise BadRow(
                        "empty_prompt", "the prompt is empty and the tokenizer adds no BOS"
                    )
                p, ids, prompt_cut, response_cut, drop = self.truncate_group(p, ids)
                if not drop:
                    self.check_length(p, {f"{column}[{j}]": r for j, r in enumerate(ids)})
            except BadRow as bad:
                if self.cfg.on_bad_row == "error":
                    raise self.fail(indices[i], bad) from None
                out["_status"][i] = f"skip:{bad.reason}"
                continue
            out["_resplit"][i] = moved
            if drop:
                out["_status"][i] = "drop:no_room_for_response"
                continue
            out["prompt_ids"][i], out["responses_ids"][i], out["scores"][i] = p, ids, scores
            out["_prompt_truncated"][i], out["_response_truncated"][i] = prompt_cut, response_cut
        return out


def _is_empty(value: str | list[dict[str, str]]) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not any(m["content"].strip() for m in value)


def _shared(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
