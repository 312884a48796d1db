"""The pairs `pairopt bench` measures: lengths from a profile (pairopt/assets/profiles.json, the
six of the prefix-sharing paper, with jitter) or from a JSONL file of real pairs, turned into
batches of random token ids (only lengths matter for speed); and the ideal speed-up of sharing.
The same file's group profiles (k responses per prompt) are read here and drawn in groups.py.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pairopt.bench.checks import check_tokenizer_dir, read_text
from pairopt.errors import PairoptError
from pairopt.pairs import PreferencePair, shared_length, unshared_length
from pairopt.sources import ASSETS_DIR

PROFILES_PATH = ASSETS_DIR / "profiles.json"

PROFILE_KEYS = ("name", "prompt_tokens", "completion_tokens")  # what a profile must have
GROUP_PROFILE_KEYS = (*PROFILE_KEYS, "responses")  # and a group profile, k responses per prompt


def load_profiles(path: Path = PROFILES_PATH) -> dict[str, dict[str, Any]]:
    """Profile name -> {prompt_tokens, completion_tokens, ideal_speedup, ...}.

    The file is JSON: {"profiles": [{"name": ..., "prompt_tokens": P, "completion_tokens": C},
    ...]}; anything else is a PairoptError naming the file, the profile and what is wrong.
    """
    where = f"--profiles-file {path}"
    try:
        data = json.loads(read_text(path, "--profiles-file"))
    except json.JSONDecodeError as err:
        raise PairoptError(
            f"{where}: not JSON ({err.msg} at line {err.lineno}, column {err.colno})."
        ) from err
    profiles = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(profiles, list) or not profiles:
        raise PairoptError(
            f'{where}: expected an object with a non-empty "profiles" list, each profile an '
            f"object with {', '.join(PROFILE_KEYS)}."
        )
    out: dict[str, dict[str, Any]] = {}
    for i, profile in enumerate(profiles, start=1):
        label = (
            f"profile {profile.get('name', i)!r}" if isinstance(profile, dict) else f"profile {i}"
        )
        if not isinstance(profile, dict):
            raise PairoptError(
                f"{where}: {label} is {type(profile).__name__}, not an object with "
                f"{', '.join(PROFILE_KEYS)}."
            )
        missing = [k for k in PROFILE_KEYS if k not in profile]
        if missing:
            raise PairoptError(
                f"{where}: {label} lacks {', '.join(missing)}; every profile needs "
                f"{', '.join(PROFILE_KEYS)}."
            )
        for key in ("prompt_tokens", "completion_tokens"):
            value = profile[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 1:
                raise PairoptError(
                    f"{where}: {label} has {key} {value!r}; it must be a number >= 1."
                )
        out[str(profile["name"])] = profile
    return out


def load_group_profiles(path: Path = PROFILES_PATH) -> dict[str, dict[str, Any]]:
    """Group profile name -> {prompt_tokens, completion_tokens, responses, source, ...}: the
    file's optional "group_profiles" list (k responses per prompt; pairopt.bench.groups)."""
    where = f"--profiles-file {path}"
    try:
        data = json.loads(read_text(path, "--profiles-file"))
    except json.JSONDecodeError as err:
        raise PairoptError(f"{where}: not JSON ({err.msg} at line {err.lineno}).") from err
    groups = data.get("group_profiles", []) if isinstance(data, dict) else []
    if not isinstance(groups, list):
        raise PairoptError(f'{where}: "group_profiles" must be a list of objects.')
    out: dict[str, dict[str, Any]] = {}
    for i, profile in enumerate(groups, start=1):
        if not isinstance(profile, dict) or any(k not in profile for k in GROUP_PROFILE_KEYS):
            raise PairoptError(
                f"{where}: group profile {i} must be an object with {', '.join(GROUP_PROFILE_KEYS)}."
            )
        for key in ("prompt_tokens", "completion_tokens", "responses"):
            value, least = profile[key], 2 if key == "responses" else 1
            if isinstance(value, bool) or not isinstance(value, int | float) or value < least:
                raise PairoptError(
                    f"{where}: group profile {profile['name']!r} has {key} {value!r}; it must be "
                    f"a number >= {least}."
                )
        out[str(profile["name"])] = profile
    return out


def profile_lengths(
    profile: dict[str, Any], n: int, jitter: float, rng: random.Random
) -> list[tuple[int, int, int]]:
    """n (P, C, R) triples around the profile's medians; C and R drawn independently."""

    def draw(x: int) -> int:
        return max(1, round(x * rng.uniform(1 - jitter, 1 + jitter)))

    P, C = int(profile["prompt_tokens"]), int(profile["completion_tokens"])
    return [(draw(P), draw(C), draw(C)) for _ in range(n)]


def dataset_lengths(path: Path, tokenizer: str | None) -> list[tuple[int, int, int]]:
    """(P, C, R) of every row of a JSONL file with prompt / chosen / rejected fields.

    Fields are token-id lists, or text tokenised with `tokenizer` (a local path) as the data
    loader does: the prompt with special tokens, each response without them plus EOS.
    """
    fields = ("prompt", "chosen", "rejected")
    rows: list[tuple[int, dict[str, Any]]] = []  # (line number, row)
    for n, line in enumerate(read_text(path, "--data").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PairoptError(
                f"--data {path} line {n}: not JSON ({err.msg} at column {err.colno}). Give a "
                "JSONL file: one object with prompt/chosen/rejected per line."
            ) from err
        if not isinstance(row, dict):
            raise PairoptError(
                f"--data {path} line {n}: a JSON {type(row).__name__}, not an object with "
                "prompt/chosen/rejected."
            )
        rows.append((n, row))
    if not rows:
        raise PairoptError(
            f"--data {path}: no rows. Give a JSONL file with prompt/chosen/rejected."
        )
    tok: Any = None
    out = []
    for n, row in rows:
        where = f"--data {path} line {n}"
        missing = [k for k in fields if k not in row]
        if missing:
            raise PairoptError(f"{where}: missing field(s) {', '.join(missing)}.")
        if all(_is_token_ids(row[k]) for k in fields):
            lengths = (len(row["prompt"]), len(row["chosen"]), len(row["rejected"]))
        elif all(isinstance(row[k], str) for k in fields):
            if tokenizer is None:
                raise PairoptError(
                    f"{where}: text fields need a tokenizer: pass --tokenizer PATH "
                    "(a local tokenizer directory), or store token-id lists."
                )
            if tok is None:
                tok = load_tokenizer(tokenizer)
            eos = 1 if tok.eos_token_id is not None else 0
            n_prompt = len(tok(row["prompt"])["input_ids"])
            n_chosen = len(tok(row["chosen"], add_special_tokens=False)["input_ids"]) + eos
            n_rejected = len(tok(row["rejected"], add_special_tokens=False)["input_ids"]) + eos
            lengths = (n_prompt, n_chosen, n_rejected)
        else:
            kinds = ", ".join(f"{k} is {type(row[k]).__name__}" for k in fields)
            raise PairoptError(
                f"{where}: prompt, chosen and rejected must all be token-id lists (of ints) or "
                f"all be text; here {kinds}."
            )
        if empty := [k for k, length in zip(fields, lengths, strict=True) if length < 1]:
            raise PairoptError(f"{where}: {', '.join(empty)} has no tokens.")
        out.append(lengths)
    return out


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def load_tokenizer(path: str) -> Any:
    check_tokenizer_dir(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise PairoptError(
            f"--tokenizer {path}: transformers cannot load a tokenizer from this directory "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})."
        ) from err


def make_batches(
    lengths: Sequence[tuple[int, int, int]], pairs_per_step: int, vocab: int, seed: int
) -> list[list[PreferencePair]]:
    """Consecutive groups of `pairs_per_step` pairs with random token ids of those lengths."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    pairs = [PreferencePair(ids(p), ids(c), ids(r)) for p, c, r in lengths]
    return [
        pairs[i : i + pairs_per_step]
        for i in range(0, len(pairs) - pairs_per_step + 1, pairs_per_step)
    ]


def ideal_speedup(pairs: Sequence[PreferencePair]) -> float:
    """sum(2P + C + R) / sum(P + C + R): tokens without sharing over tokens with it."""
    unshared = sum(unshared_length(*p.lengths()) for p in pairs)
    shared = sum(shared_length(*p.lengths()) for p in pairs)
    return unshared / shared
