"""`pairopt bench --group-profiles`: k responses per prompt, every pair at the cost of one forward.

A group profile (`group_profiles` in pairopt/assets/profiles.json) is a prompt length P, a
response length C and k responses per prompt. Each measured prompt gets k responses with
distinct random scores, and its pairs are chosen as the trainer chooses them (`data.pairs`):
`all` (every two responses, the better one chosen) or `best_worst` (the best against the worst;
the other responses are not computed, as in training). Three modes train on the same pairs
of the same batches, through the engine:

    group-shared   one [prompt | r_1 | ... | r_k] segment per prompt, every response computed
                   once (`compute_group_logps`), each pair's log-probs indexed out of it
    pair-shared    one [prompt | chosen | rejected] segment per pair (`compute_logps`)
    unshared       one [prompt | response] segment per response of every pair (the classic
                   computation, as TRL runs it, here packed)

all packed into one row per step. The token ideal of group-shared over unshared is
sum over pairs (2P + n_c + n_r) / sum over prompts (P + n_1 + ... + n_k), and the fraction of
the ideal is the measured speed-up (median of per-round ratios, as in `run.py`) over it. A step
is the forward, a reference-free DPO loss on every pair, and `backward()`; rounds interleave
the modes in a rotating order, exactly like the pair profiles.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import torch
from torch import nn

from pairopt.bench.measure import peak_memory, sync
from pairopt.bench.model import ModelShape, build_model
from pairopt.bench.run import BenchOptions, ModeResult
from pairopt.engine.forward import compute_group_logps, compute_logps
from pairopt.engine.layout import round_up
from pairopt.errors import PairoptError
from pairopt.pairs import PairLogps, PreferencePair, ResponseGroup

GROUP_MODES = ("group-shared", "pair-shared", "unshared")
GROUP_PAIRS = ("all", "best_worst")


@dataclass
class GroupStep:
    """One step's data: the groups, their pairs as flat indices and written out as pairs."""

    groups: list[ResponseGroup]
    chosen: torch.Tensor  # (N,) flat response indices
    rejected: torch.Tensor
    pairs: list[PreferencePair]

    def tokens(self, mode: str) -> int:
        """Tokens the mode processes: P + sum n per prompt, P + n_c + n_r or 2P + n_c + n_r per pair."""
        if mode == "group-shared":
            return sum(len(g.prompt) + sum(map(len, g.responses)) for g in self.groups)
        copies = 1 if mode == "pair-shared" else 2
        return sum(copies * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in self.pairs)


def group_pairs(scores: Sequence[float], how: str) -> list[tuple[int, int]]:
    """The pairs of one prompt with distinct scores, as pairopt.data.groups.pick_pairs picks
    them (without ties, which these random scores never have)."""
    k = len(scores)
    if how == "best_worst":
        best, worst = max(range(k), key=scores.__getitem__), min(range(k), key=scores.__getitem__)
        return [(best, worst)]
    return [(i, j) if scores[i] > scores[j] else (j, i) for i, j in combinations(range(k), 2)]


def draw_group_steps(
    profile: dict[str, Any],
    how: str,
    opts: BenchOptions,
    groups_per_step: int,
    vocab: int,
    seed: int,
) -> list[GroupStep]:
    """`warmup + steps` steps of `groups_per_step` prompts around the profile's lengths."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    P, C, k = (int(profile[key]) for key in ("prompt_tokens", "completion_tokens", "responses"))

    def draw(x: int) -> int:
        return max(1, round(x * rng.uniform(1 - opts.jitter, 1 + opts.jitter)))

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    steps = []
    for _ in range(opts.warmup + opts.steps):
        groups: list[ResponseGroup] = []
        chosen: list[int] = []
        rejected: list[int] = []
        pairs: list[PreferencePair] = []
        for _ in range(groups_per_step):
            prompt, responses = ids(draw(P)), [ids(draw(C)) for _ in range(k)]
            scores = rng.sample(range(k), k)  # distinct: no ties
            picked = group_pairs(scores, how)
            used = sorted({i for pair in picked for i in pair})  # the rest is not computed
            first = sum(len(gr.responses) for gr in groups)
            groups.append(ResponseGroup(prompt, [responses[i] for i in used]))
            for c, r in picked:
                chosen.append(first + used.index(c))
                rejected.append(first + used.index(r))
                pairs.append(PreferencePair(prompt, responses[c], responses[r]))
        steps.append(GroupStep(groups, torch.tensor(chosen), torch.tensor(rejected), pairs))
    return steps


def group_step(
    model: nn.Module, step: GroupStep, mode: str, budget: int, opts: BenchOptions
) -> None:
    """Forward in `mode`, reference-free DPO loss on every pair, backward; grads dropped."""
    kwargs: dict[str, Any] = {
        "backend": opts.backend,
        "chunk_size": opts.chunk_size,
        "max_tokens_per_row": budget,
        "bucket_size": opts.bucket_size,
    }
    if mode == "group-shared":
        out: PairLogps = compute_group_logps(model, step.groups, **kwargs).pairs(
            step.chosen, step.rejected
        )
    else:
        out = compute_logps(model, step.pairs, share_prefix=mode == "pair-shared", **kwargs)
    loss = -torch.nn.functional.logsigmoid(0.1 * (out.chosen_logps - out.rejected_logps)).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


@dataclass
class GroupProfileResult:
    profile: str
    pairs: str  # "all" or "best_worst"
    responses: int  # k per prompt (before best_worst drops the unpaired ones)
    groups_per_step: int
    pairs_per_step: float
    prompt_tokens: float  # means over the measured prompts
    completion_tokens: float
    ideal_vs_unshared: float  # unshared tokens / group-shared tokens
    ideal_vs_pair_shared: float  # pair-shared tokens / group-shared tokens
    modes: dict[str, ModeResult]
    fraction_of_ideal: float = 0.0  # group-shared's speed-up over unshared / ideal
    source: str = ""
    notes: list[str] = field(default_factory=list)


def run_group_profile(
    name: str,
    profile: dict[str, Any],
    how: str,
    model: nn.Module,
    steps: list[GroupStep],
    opts: BenchOptions,
    log: Callable[[str], None] = print,
) -> GroupProfileResult:
    """Warm-up rounds, then measured rounds of every mode on the same step, rotating order."""
    device = next(model.parameters()).device
    clock = time.process_time if opts.timer == "cpu" else time.perf_counter
    budgets = {
        m: opts.row_tokens or round_up(max(s.tokens(m) for s in steps), opts.bucket_size)
        for m in GROUP_MODES
    }
    times: dict[str, list[float]] = {m: [] for m in GROUP_MODES}
    for r, step in enumerate(steps):
        order = GROUP_MODES[r % 3 :] + GROUP_MODES[: r % 3]
        for mode in order:
            sync(device)
            start = clock()
            group_step(model, step, mode, budgets[mode], opts)
            sync(device)
            if r >= opts.warmup:
                times[mode].append(clock() - start)
        log(f"  {name} (pairs={how}): round {r + 1}/{len(steps)} done")
    measured = steps[opts.warmup :]
    results = {m: _mode_result(m, model, measured, times, budgets[m], opts) for m in GROUP_MODES}
    for res in results.values():
        res.speedup = {
            b: statistics.median(tb / tm for tb, tm in zip(times[b], times[res.mode], strict=True))
            for b in ("unshared", "pair-shared")
        }
    tokens = {m: sum(s.tokens(m) for s in measured) for m in GROUP_MODES}
    ideal = tokens["unshared"] / tokens["group-shared"]
    group = results["group-shared"]
    group.fraction_of_ideal = group.speedup["unshared"] / ideal
    prompts = [gr for s in measured for gr in s.groups]
    return GroupProfileResult(
        profile=name,
        pairs=how,
        responses=int(profile["responses"]),
        groups_per_step=len(measured[0].groups),
        pairs_per_step=statistics.mean(len(s.pairs) for s in measured),
        prompt_tokens=statistics.mean(len(g.prompt) for g in prompts),
        completion_tokens=statistics.mean(len(r) for g in prompts for r in g.responses),
        ideal_vs_unshared=ideal,
        ideal_vs_pair_shared=tokens["pair-shared"] / tokens["group-shared"],
        modes=results,
        fraction_of_ideal=group.fraction_of_ideal,
        source=str(profile.get("source", "")),
    )


def _mode_result(
    mode: str,
    model: nn.Module,
    measured: list[GroupStep],
    times: dict[str, list[float]],
    budget: int,
    opts: BenchOptions,
) -> ModeResult:
    device = next(model.parameters()).device
    memory = None
    if opts.measure_memory:
        memory = peak_memory(device, lambda: group_step(model, measured[0], mode, budget, opts))
    total = sum(times[mode])
    return ModeResult(
        mode=mode,
        step_s=statistics.median(times[mode]),
        step_s_all=times[mode],
        tokens_per_s=sum(s.tokens(mode) for s in measured) / total,
        pairs_per_s=sum(len(s.pairs) for s in measured) / total,
        peak_memory_mib=None if memory is None else memory / 2**20,
        packing_efficiency=1.0,  # one row per step, padded to a multiple of bucket_size
        rows=1,
        row_length=budget,
        compiles=0,
        attn_implementation=str(getattr(model.config, "_attn_implementation", "")),
    )


def run_groups(
    opts: BenchOptions,
    shape: ModelShape,
    profiles: dict[str, dict[str, Any]],
    pairs: Sequence[str],
    groups_per_step: int,
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None] = print,
) -> list[GroupProfileResult]:
    """Every group profile under every pairs choice, on one model."""
    for how in pairs:
        if how not in GROUP_PAIRS:
            raise PairoptError(f"--group-pairs {how!r}: choose from {', '.join(GROUP_PAIRS)}.")
    model = build_model(shape, str(device), dtype, opts.seed)
    results = []
    for i, (name, profile) in enumerate(profiles.items()):
        for how in pairs:
            steps = draw_group_steps(
                profile, how, opts, groups_per_step, shape.vocab, opts.seed + i
            )
            log(f"{name} (k={profile['responses']}, pairs={how}): {len(steps)} steps")
            results.append(run_group_profile(name, profile, how, model, steps, opts, log))
    return results
