"""`pairopt bench`: shared vs unshared, padded vs packed, side by side in one process.

Modes, all through `compute_logps` on the same model and the same batches:

    unshared-padded   one [prompt | response] segment per row, rows padded (the classic way)
    unshared-packed   the same segments bin-packed into rows (sharing off, packed)
    shared            one [prompt | chosen | rejected] segment per row, padded
    shared-packed     shared segments bin-packed (pairopt's default)

Ideal speed-up of sharing = unshared tokens / shared tokens = sum(2P + C + R) / sum(P + C + R)
over the measured pairs. The speed-up of a mode over a baseline is the median over rounds of the
baseline's step time over the mode's on the same batch; the best unshared mode is the one with
the least total time; the *fraction of the ideal* is the speed-up over it divided by the ideal. A step is `compute_logps` (layout building included), a reference-free
DPO loss and `backward()`; no optimiser step (it costs the same in every mode).

Rounds interleave the modes (each round runs every mode once, on the same batch, in a rotating
order), so load from other processes falls on every mode alike; step times are medians over
rounds. Peak memory is what torch allocates during one step above what was allocated before it:
`torch.cuda.max_memory_allocated` on CUDA; on the CPU, the running sum of every allocation and
free the profiler records (`profile_memory=True`) over one extra step.

Data comes from a length profile (`pairopt/assets/profiles.json`, the six of the prefix-sharing
paper) with uniform jitter on P, C and R, or from a JSONL file of real pairs (token ids, or text
with `--tokenizer`); only lengths matter for speed, so token ids are drawn at random.

Other commands: `--memory-sweep 32000,128000,256000` (LM-head peak memory, chunked vs full logits),
`--peer` (TRL's DPOTrainer vs pairopt, pairopt.bench.peer). Nothing here imports pydantic, datasets or
matplotlib at module level: the bench runs on a bare torch + transformers machine (the PNG is
skipped with a message when matplotlib is absent). Options are argparse + a frozen dataclass,
not a pydantic config, for that reason.
"""

from __future__ import annotations

import functools
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pairopt.bench.data import ideal_speedup, make_batches, profile_lengths
from pairopt.bench.measure import peak_memory, step_breakdown, sync
from pairopt.bench.model import ModelShape, build_model
from pairopt.engine.forward import compute_logps
from pairopt.engine.layout import Layout, build_layout, round_up
from pairopt.engine.masks import varlen_plan
from pairopt.engine.varlen_cpu import cpu_schedule
from pairopt.errors import PairoptError
from pairopt.pairs import PreferencePair, row_need, shared_length, unshared_length

MODES: dict[str, tuple[bool, bool]] = {  # name -> (share_prefix, packing)
    "unshared-padded": (False, False),
    "unshared-packed": (False, True),
    "shared": (True, False),
    "shared-packed": (True, True),
}
BASELINES = ("unshared-padded", "unshared-packed")


@dataclass(frozen=True)
class BenchOptions:
    modes: tuple[str, ...] = tuple(MODES)
    pairs_per_step: int = 4
    steps: int = 3  # measured rounds
    warmup: int = 1  # unmeasured rounds first
    jitter: float = 0.25  # P, C, R drawn uniformly in [(1 - j) x, (1 + j) x]
    seed: int = 0
    backend: str = "auto"
    row_tokens: int = 0  # packed row budget; 0: the whole step in one row
    bucket_size: int = 64
    fixed_shapes: bool = False  # packed rows padded to one fixed length per run (compilers)
    chunk_size: int = 1024
    measure_memory: bool = True
    timer: str = "wall"  # or "cpu": process CPU time, immune to waiting for a shared CPU
    breakdown: bool = False  # profile the batches once more: attention / matmul / other / layout


# ----------------------------------------------------------------------------- step


def row_budget(opts: BenchOptions, batches: Sequence[Sequence[PreferencePair]], share: bool) -> int:
    """Packed row budget: the option, or the largest step (all of a step in one row).

    With fixed shapes the budget is also the bucket, so every packed row has one length.
    """
    if opts.row_tokens:
        return opts.row_tokens
    length = shared_length if share else unshared_length
    most = max(sum(length(*p.lengths()) for p in b) for b in batches)
    return round_up(most, 1024 if opts.fixed_shapes else opts.bucket_size)


def layout_kwargs(
    opts: BenchOptions, mode: str, batches: Sequence[Sequence[PreferencePair]]
) -> dict[str, Any]:
    share, pack = MODES[mode]
    kwargs: dict[str, Any] = {"share_prefix": share, "packing": pack}
    kwargs["bucket_size"] = opts.bucket_size
    if pack:
        budget = row_budget(opts, batches, share)
        kwargs["max_tokens_per_row"] = budget
        if opts.fixed_shapes:
            kwargs["bucket_size"] = budget
    return kwargs


def train_step(
    model: nn.Module, pairs: Sequence[PreferencePair], kwargs: dict[str, Any], opts: BenchOptions
) -> None:
    """Forward + reference-free DPO loss + backward; gradients are dropped afterwards."""
    out = compute_logps(model, pairs, backend=opts.backend, chunk_size=opts.chunk_size, **kwargs)
    loss = -torch.nn.functional.logsigmoid(0.1 * (out.chosen_logps - out.rejected_logps)).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def compile_count() -> int:
    """Graphs torch.compile has produced so far in this process (FlexAttention compiles)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # dynamo unavailable: nothing can have compiled
        return 0


@dataclass
class ModeResult:
    mode: str
    step_s: float  # median over the measured rounds
    step_s_all: list[float]
    tokens_per_s: float  # tokens the model processed (real, not padding) per second
    pairs_per_s: float
    peak_memory_mib: float | None
    packing_efficiency: float  # real tokens / padded tokens
    rows: int
    row_length: int
    compiles: int
    attn_implementation: str  # what backend="auto" (or the option) ran: the model's setting
    breakdown: dict[str, float] | None = None  # seconds by kind of work, over the batches
    speedup: dict[str, float] = field(default_factory=dict)  # over each baseline
    fraction_of_ideal: float | None = None  # speed-up over the best baseline / ideal


@dataclass
class ProfileResult:
    profile: str
    prompt_tokens: float  # means over the measured pairs
    completion_tokens: float
    pairs_per_step: int
    ideal_speedup: float
    best_baseline: str
    modes: dict[str, ModeResult]


@dataclass
class Rounds:
    """What the timed rounds saw, per mode: step times, compilations, the implementation run."""

    times: dict[str, list[float]]
    compiles: dict[str, int]
    implementation: dict[str, str]


def run_rounds(
    name: str,
    model: nn.Module,
    batches: list[list[PreferencePair]],
    kwargs: dict[str, dict[str, Any]],
    opts: BenchOptions,
    log: Callable[[str], None],
) -> Rounds:
    """Every mode once per round on the round's batch, in a rotating order; the first
    `opts.warmup` rounds are not timed."""
    device = next(model.parameters()).device
    clock = time.process_time if opts.timer == "cpu" else time.perf_counter
    rounds = Rounds(
        {m: [] for m in opts.modes}, dict.fromkeys(opts.modes, 0), dict.fromkeys(opts.modes, "")
    )
    for r, batch in enumerate(batches[: opts.warmup + opts.steps]):
        order = list(opts.modes[r % len(opts.modes) :] + opts.modes[: r % len(opts.modes)])
        for mode in order:
            before = compile_count()
            sync(device)
            start = clock()
            train_step(model, batch, kwargs[mode], opts)
            sync(device)
            if r >= opts.warmup:
                rounds.times[mode].append(clock() - start)
            rounds.compiles[mode] += compile_count() - before
            rounds.implementation[mode] = str(getattr(model.config, "_attn_implementation", ""))
        log(f"  {name}: round {r + 1}/{opts.warmup + opts.steps} done")
    return rounds


def cpu_breakdown(
    model: nn.Module,
    measured: list[list[PreferencePair]],
    kw: dict[str, Any],
    opts: BenchOptions,
) -> dict[str, float]:
    """Seconds by kind of work (attention / matmul / other ops / layout), summed over the
    measured batches (one step alone is noisy)."""
    breakdown: dict[str, float] = {}
    for batch in measured:
        step = functools.partial(train_step, model, batch, kw, opts)

        def build(b: list[PreferencePair] = batch) -> None:
            cpu_schedule(varlen_plan(build_layout([p.as_group() for p in b], **kw)))

        for part, seconds in step_breakdown(step, build).items():
            breakdown[part] = breakdown.get(part, 0.0) + seconds
    return breakdown


def mode_result(
    mode: str,
    model: nn.Module,
    measured: list[list[PreferencePair]],
    kw: dict[str, Any],
    rounds: Rounds,
    opts: BenchOptions,
) -> ModeResult:
    """One mode's numbers: times from the rounds, layouts rebuilt untimed, memory measured."""
    device = next(model.parameters()).device
    layouts: list[Layout] = [build_layout([p.as_group() for p in b], **kw) for b in measured]
    real = sum(lay.real_tokens for lay in layouts)
    padded = sum(lay.padded_tokens for lay in layouts)
    times = rounds.times[mode]
    memory = None
    if opts.measure_memory:
        memory = peak_memory(device, functools.partial(train_step, model, measured[0], kw, opts))
    breakdown = None
    if opts.breakdown and device.type == "cpu":
        breakdown = cpu_breakdown(model, measured, kw, opts)
    return ModeResult(
        mode=mode,
        step_s=statistics.median(times),
        step_s_all=times,
        tokens_per_s=real / sum(times),
        pairs_per_s=sum(len(b) for b in measured) / sum(times),
        peak_memory_mib=None if memory is None else memory / 2**20,
        packing_efficiency=real / padded,
        rows=max(lay.shape[0] for lay in layouts),
        row_length=max(lay.shape[1] for lay in layouts),
        compiles=rounds.compiles[mode],
        attn_implementation=rounds.implementation[mode],
        breakdown=breakdown,
    )


def run_profile(
    name: str,
    model: nn.Module,
    batches: list[list[PreferencePair]],
    opts: BenchOptions,
    log: Callable[[str], None] = print,
) -> ProfileResult:
    """Warm-up rounds, then interleaved measured rounds; see the module docstring."""
    if len(batches) < opts.warmup + opts.steps:
        raise PairoptError(
            f"profile {name}: {len(batches)} batches for {opts.warmup} warm-up + {opts.steps} "
            "measured rounds; give more data or fewer --steps / --pairs-per-step."
        )
    measured = batches[opts.warmup : opts.warmup + opts.steps]
    kwargs = {m: layout_kwargs(opts, m, batches) for m in opts.modes}
    rounds = run_rounds(name, model, batches, kwargs, opts, log)
    results = {m: mode_result(m, model, measured, kwargs[m], rounds, opts) for m in opts.modes}
    pairs = [p for b in measured for p in b]
    ideal = ideal_speedup(pairs)
    present = [b for b in BASELINES if b in results]
    best = min(present, key=lambda b: sum(rounds.times[b])) if present else ""
    for res in results.values():
        # paired: each round ran every mode on the same batch, so the per-round ratio cancels
        # the batch-to-batch variation in size that a ratio of medians would keep
        res.speedup = {
            b: statistics.median(
                tb / tm for tb, tm in zip(rounds.times[b], rounds.times[res.mode], strict=True)
            )
            for b in present
        }
        if best:
            res.fraction_of_ideal = res.speedup[best] / ideal
    return ProfileResult(
        profile=name,
        prompt_tokens=statistics.mean(len(p.prompt) for p in pairs),
        completion_tokens=statistics.mean((len(p.chosen) + len(p.rejected)) / 2 for p in pairs),
        pairs_per_step=len(measured[0]),
        ideal_speedup=ideal,
        best_baseline=best,
        modes=results,
    )


def draw_batches(
    opts: BenchOptions,
    shape: ModelShape,
    sources: dict[str, list[tuple[int, int, int]] | dict[str, Any]],
) -> dict[str, list[list[PreferencePair]]]:
    """Each source's batches (a profile dict or a list of (P, C, R)), checked: enough of them
    for the rounds and every pair within --row-tokens, so bad input fails before any model."""
    n = (opts.warmup + opts.steps) * opts.pairs_per_step
    drawn = {}
    for i, (name, source) in enumerate(sources.items()):
        rng = random.Random(opts.seed + i)
        if isinstance(source, dict):
            lengths = profile_lengths(source, n, opts.jitter, rng)
        else:
            lengths = list(source)
            rng.shuffle(lengths)
        batches = make_batches(lengths, opts.pairs_per_step, shape.vocab, opts.seed + i)
        check_batches(name, batches, opts)
        drawn[name] = batches
    return drawn


def run_batches(
    opts: BenchOptions,
    shape: ModelShape,
    drawn: dict[str, list[list[PreferencePair]]],
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None] = print,
) -> list[ProfileResult]:
    """Bench every source's batches (`draw_batches`) on one model."""
    model = build_model(shape, str(device), dtype, opts.seed)
    results = []
    for name, batches in drawn.items():
        log(f"{name}: {len(batches)} batches of {opts.pairs_per_step} pairs")
        results.append(run_profile(name, model, batches, opts, log))
    return results


def run(
    opts: BenchOptions,
    shape: ModelShape,
    sources: dict[str, list[tuple[int, int, int]] | dict[str, Any]],
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None] = print,
) -> list[ProfileResult]:
    """Bench every source (a profile dict or a list of (P, C, R)) on one model."""
    return run_batches(opts, shape, draw_batches(opts, shape, sources), device, dtype, log)


def check_batches(
    name: str, batches: Sequence[Sequence[PreferencePair]], opts: BenchOptions
) -> None:
    """Enough batches for the rounds, and every pair fits one packed row of --row-tokens."""
    if len(batches) < opts.warmup + opts.steps:
        raise PairoptError(
            f"profile {name}: {len(batches)} batches of {opts.pairs_per_step} pairs for "
            f"{opts.warmup} warm-up + {opts.steps} measured rounds; give more data or fewer "
            "--steps / --warmup / --pairs-per-step."
        )
    if not opts.row_tokens:
        return
    for mode in opts.modes:
        share, pack = MODES[mode]
        if not pack:
            continue
        # a packed row holds whole segments: the pair (shared) or prompt + one response
        need = max(
            row_need(*p.lengths(), share) for b in batches[: opts.warmup + opts.steps] for p in b
        )
        if need > opts.row_tokens:
            what = "prompt + both responses" if share else "prompt + one response"
            raise PairoptError(
                f"--row-tokens {opts.row_tokens}: profile {name} has a pair needing {need} "
                f"tokens in one row in mode {mode} ({what}). Raise --row-tokens to at least "
                f"{need}, or give 0 (a whole step per row)."
            )
