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
`--peer` (TRL's DPOTrainer vs pairopt, pairopt.peer). Nothing here imports pydantic, datasets or
matplotlib at module level: the bench runs on a bare torch + transformers machine (the PNG is
skipped with a message when matplotlib is absent). Options are argparse + a frozen dataclass,
not a pydantic config, for that reason.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pairopt.bench_checks import (
    check_flex_device,
    check_numbers,
    check_shape,
    check_tokenizer_dir,
    parse_vocabs,
    resolve_device,
    resolve_dtype,
)
from pairopt.bench_data import (
    PROFILES_PATH,
    dataset_lengths,
    ideal_speedup,
    load_profiles,
    make_batches,
    profile_lengths,
)
from pairopt.errors import PairoptError
from pairopt.pairs import PreferencePair

MODES: dict[str, tuple[bool, bool]] = {  # name -> (share_prefix, packing)
    "unshared-padded": (False, False),
    "unshared-packed": (False, True),
    "shared": (True, False),
    "shared-packed": (True, True),
}
BASELINES = ("unshared-padded", "unshared-packed")


@dataclass(frozen=True)
class ModelShape:
    """A Llama with random weights. CPU default: the LM head costs ~12% of a token's forward,
    about what it costs in the GPU shape (2048 x 16 layers, 32k vocab: ~8%) and in 7-8B models;
    a 32k vocab on a 2-layer model would make the head (identical in every mode) dominate."""

    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 704
    vocab: int = 1024


GPU_SHAPE = ModelShape(hidden=2048, layers=16, heads=16, kv_heads=4, intermediate=5632, vocab=32000)


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


# ----------------------------------------------------------------------------- model and step


def build_model(
    shape: ModelShape, device: str, dtype: torch.dtype, seed: int, **config: Any
) -> nn.Module:
    """A randomly initialised Llama of `shape` under `seed`; `config`: more LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llama = LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        max_position_embeddings=32768,
        **config,
    )
    model: nn.Module = LlamaForCausalLM(llama)
    return model.to(
        device=device, dtype=dtype
    ).train()  # Llama has no dropout: train mode passes check_dropout


def row_budget(opts: BenchOptions, batches: Sequence[Sequence[PreferencePair]], share: bool) -> int:
    """Packed row budget: the option, or the largest step (all of a step in one row).

    With fixed shapes the budget is also the bucket, so every packed row has one length.
    """
    if opts.row_tokens:
        return opts.row_tokens
    from pairopt.engine.layout import round_up
    from pairopt.packing import segment_length

    most = max(
        sum(segment_length(len(p.prompt), [len(p.chosen), len(p.rejected)], share) for p in b)
        for b in batches
    )
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
    from pairopt.engine.forward import compute_logps

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


def run_profile(
    name: str,
    model: nn.Module,
    batches: list[list[PreferencePair]],
    opts: BenchOptions,
    log: Callable[[str], None] = print,
) -> ProfileResult:
    """Warm-up rounds, then interleaved measured rounds; see the module docstring."""
    from pairopt.bench_measure import peak_memory, step_breakdown, sync
    from pairopt.engine.attention import cpu_schedule
    from pairopt.engine.layout import build_layout
    from pairopt.engine.masks import varlen_plan

    device = next(model.parameters()).device
    if len(batches) < opts.warmup + opts.steps:
        raise PairoptError(
            f"profile {name}: {len(batches)} batches for {opts.warmup} warm-up + {opts.steps} "
            "measured rounds; give more data or fewer --steps / --pairs-per-step."
        )
    measured = batches[opts.warmup : opts.warmup + opts.steps]
    kwargs = {m: layout_kwargs(opts, m, batches) for m in opts.modes}
    times: dict[str, list[float]] = {m: [] for m in opts.modes}
    clock = time.process_time if opts.timer == "cpu" else time.perf_counter
    compiles = dict.fromkeys(opts.modes, 0)
    implementation = dict.fromkeys(opts.modes, "")
    for r, batch in enumerate(batches[: opts.warmup + opts.steps]):
        order = list(opts.modes[r % len(opts.modes) :] + opts.modes[: r % len(opts.modes)])
        for mode in order:
            before = compile_count()
            sync(device)
            start = clock()
            train_step(model, batch, kwargs[mode], opts)
            sync(device)
            if r >= opts.warmup:
                times[mode].append(clock() - start)
            compiles[mode] += compile_count() - before
            implementation[mode] = str(getattr(model.config, "_attn_implementation", ""))
        log(f"  {name}: round {r + 1}/{opts.warmup + opts.steps} done")

    pairs = [p for b in measured for p in b]
    results: dict[str, ModeResult] = {}
    for mode in opts.modes:
        layouts = [
            build_layout(
                [p.as_group() for p in b],
                **{k: v for k, v in kwargs[mode].items()},
            )
            for b in measured
        ]
        real = sum(lay.real_tokens for lay in layouts)
        padded = sum(lay.padded_tokens for lay in layouts)
        median_s = statistics.median(times[mode])
        memory = None
        if opts.measure_memory:
            step = functools.partial(train_step, model, measured[0], kwargs[mode], opts)
            memory = peak_memory(device, step)
        breakdown: dict[str, float] | None = None
        if opts.breakdown and device.type == "cpu":
            breakdown = {}
            for batch in measured:  # summed over the measured batches: one step is noisy
                step = functools.partial(train_step, model, batch, kwargs[mode], opts)

                def build(kw: dict[str, Any] = kwargs[mode], b: Any = batch) -> None:
                    layout = build_layout([p.as_group() for p in b], **kw)
                    cpu_schedule(varlen_plan(layout))

                for part, seconds in step_breakdown(step, build).items():
                    breakdown[part] = breakdown.get(part, 0.0) + seconds
        results[mode] = ModeResult(
            mode=mode,
            step_s=median_s,
            step_s_all=times[mode],
            tokens_per_s=real / sum(times[mode]),
            pairs_per_s=len(pairs) / sum(times[mode]),
            peak_memory_mib=None if memory is None else memory / 2**20,
            packing_efficiency=real / padded,
            rows=max(lay.shape[0] for lay in layouts),
            row_length=max(lay.shape[1] for lay in layouts),
            compiles=compiles[mode],
            attn_implementation=implementation[mode],
            breakdown=breakdown,
        )
    ideal = ideal_speedup(pairs)
    present = [b for b in BASELINES if b in results]
    best = min(present, key=lambda b: sum(times[b])) if present else ""
    for res in results.values():
        # paired: each round ran every mode on the same batch, so the per-round ratio cancels
        # the batch-to-batch variation in size that a ratio of medians would keep
        res.speedup = {
            b: statistics.median(tb / tm for tb, tm in zip(times[b], times[res.mode], strict=True))
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


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    d, s = BenchOptions(), ModelShape()
    p = argparse.ArgumentParser(
        prog="pairopt bench",
        description="Step time of unshared/shared x padded/packed, side by side; "
        "see docs/benchmarks.md.",
    )
    p.add_argument("--profiles", default="all", help="comma-separated profile names, or all")
    p.add_argument(
        "--profiles-file",
        type=Path,
        default=PROFILES_PATH,
        help="profiles JSON (default: the six shipped in pairopt/assets/profiles.json)",
    )
    p.add_argument("--data", type=Path, help="JSONL of real pairs (replaces --profiles)")
    p.add_argument("--tokenizer", help="local tokenizer directory for text in --data")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    p.add_argument("--pairs-per-step", type=int, default=d.pairs_per_step)
    p.add_argument("--steps", type=int, default=d.steps, help="measured rounds")
    p.add_argument("--warmup", type=int, default=d.warmup, help="unmeasured rounds first")
    p.add_argument("--jitter", type=float, default=d.jitter, help="relative length jitter")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backend", default=d.backend, help="auto, sdpa, eager, flex or varlen")
    p.add_argument("--row-tokens", type=int, default=d.row_tokens, help="0: a step per row")
    p.add_argument("--bucket-size", type=int, default=d.bucket_size)
    p.add_argument(
        "--fixed-shapes", action="store_true", help="pad packed rows to one length (compilers)"
    )
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="LM-head chunk")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="CPU: profile each measured batch once more per mode (attention / matmul / "
        "other ops / layout)",
    )
    p.add_argument(
        "--timer",
        choices=("wall", "cpu"),
        default=d.timer,
        help="step clock: wall time, or process CPU time (CPU only; on a shared machine it "
        "leaves out the time spent waiting for a core)",
    )
    p.add_argument("--hidden", type=int, default=s.hidden)
    p.add_argument("--layers", type=int, default=s.layers)
    p.add_argument("--heads", type=int, default=s.heads)
    p.add_argument("--kv-heads", type=int, default=s.kv_heads)
    p.add_argument("--intermediate", type=int, default=s.intermediate)
    p.add_argument("--vocab", type=int, default=s.vocab)
    p.add_argument("--gpu-shape", action="store_true", help=f"model shape {GPU_SHAPE}")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda), float32, bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory")
    p.add_argument("--no-png", action="store_true")
    p.add_argument(
        "--memory-sweep",
        help="comma-separated vocab sizes: LM-head peak memory, chunked vs full logits",
    )
    p.add_argument("--sweep-tokens", type=int, default=2048, help="scored tokens in the sweep")
    p.add_argument(
        "--chunk-elements",
        type=int,
        default=2**25,
        help="sweep: also chunk by a logits budget, rows = this // vocab (2^25: 128 MiB fp32)",
    )
    p.add_argument(
        "--peer", action="store_true", help="TRL DPOTrainer vs pairopt (see pairopt.peer --help)"
    )
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise PairoptError(f"--modes {args.modes!r}: choose from {', '.join(MODES)}.")
    check_numbers(args)
    if not 0 <= args.jitter < 1:
        raise PairoptError(f"--jitter must be in [0, 1), got {args.jitter}.")
    device = resolve_device(args.device)
    if args.timer == "cpu" and device.type == "cuda":
        raise PairoptError("--timer cpu measures CPU time: on CUDA use --timer wall.")
    from pairopt.engine.attention import BACKENDS

    if args.backend not in ("auto", *BACKENDS):
        raise PairoptError(f"--backend {args.backend!r}: choose auto, {', '.join(BACKENDS)}.")
    if args.backend == "flex":
        check_flex_device(device, "--backend")
    return BenchOptions(
        modes=modes,
        pairs_per_step=args.pairs_per_step,
        steps=args.steps,
        warmup=args.warmup,
        jitter=args.jitter,
        seed=args.seed,
        backend=args.backend,
        row_tokens=args.row_tokens,
        bucket_size=args.bucket_size,
        fixed_shapes=args.fixed_shapes,
        chunk_size=args.chunk_size,
        measure_memory=not args.no_memory,
        timer=args.timer,
        breakdown=args.breakdown,
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
            len(p.prompt)
            + (len(p.chosen) + len(p.rejected) if share else max(len(p.chosen), len(p.rejected)))
            for b in batches[: opts.warmup + opts.steps]
            for p in b
        )
        if need > opts.row_tokens:
            what = "prompt + both responses" if share else "prompt + one response"
            raise PairoptError(
                f"--row-tokens {opts.row_tokens}: profile {name} has a pair needing {need} "
                f"tokens in one row in mode {mode} ({what}). Raise --row-tokens to at least "
                f"{need}, or give 0 (a whole step per row)."
            )


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PairoptError(f"--out {out}: cannot make the output directory ({err}).") from err


def main(argv: list[str] | None = None) -> int:
    from pairopt.bench_measure import memory_sweep
    from pairopt.bench_report import environment, format_table, write_chart

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--peer" in argv:  # the peer has its own options
        from pairopt import peer

        return peer.main([a for a in argv if a != "--peer"])
    args = _parser().parse_args(argv)
    check_numbers(args)  # before anything is built or written
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_sweep:
        vocabs = parse_vocabs(args.memory_sweep)
        _make_out(args.out)
        rows = memory_sweep(
            vocabs,
            args.hidden,
            args.sweep_tokens,
            args.chunk_size,
            args.chunk_elements,
            str(device),
        )
        print(
            f"LM head over {args.sweep_tokens} scored tokens, hidden {args.hidden}: peak MiB "
            "of forward + backward above the weights and their gradient"
        )
        print(
            f"{'vocab':>8}{'(V,D) fp32':>12}{'(T,V) fp32':>12}{'full logits':>13}"
            f"{'chunk rows':>12}{'chunked':>9}{'budget rows':>13}{'chunked':>9}"
        )
        for r in rows:
            print(
                f"{r['vocab']:>8}{r['weight_mib']:>12.0f}{r['logits_tensor_mib']:>12.0f}"
                f"{r['full_logits_mib']:>13.0f}"
                f"{r['chunk_rows']:>12}{r['chunked_mib']:>9.0f}"
                f"{r['budget_chunk_rows']:>13}{r['budget_chunked_mib']:>9.0f}"
            )
        out: dict[str, Any] = {"command": "pairopt bench " + " ".join(argv), "rows": rows}
        out["environment"] = environment(device)
        (args.out / "memory.json").write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out / 'memory.json'}")
        return 0
    opts = options_from_args(args)
    dtype = resolve_dtype(args.dtype, device)
    shape = (
        GPU_SHAPE
        if args.gpu_shape
        else ModelShape(
            args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab
        )
    )
    check_shape(shape)
    if args.tokenizer is not None:
        check_tokenizer_dir(args.tokenizer)
    sources: dict[str, Any]
    if args.data is not None:
        sources = {args.data.stem: dataset_lengths(args.data, args.tokenizer)}
    else:
        profiles = load_profiles(args.profiles_file)
        names = (
            list(profiles)
            if args.profiles == "all"
            else [n.strip() for n in args.profiles.split(",")]
        )
        bad = [n for n in names if n not in profiles]
        if bad:
            raise PairoptError(
                f"--profiles: unknown {', '.join(bad)}; choose from {', '.join(profiles)} or all."
            )
        sources = {n: profiles[n] for n in names}
    drawn = draw_batches(opts, shape, sources)
    _make_out(args.out)
    started = time.perf_counter()
    results = run_batches(opts, shape, drawn, device, dtype)
    table = format_table(results)
    print(table)
    report: dict[str, Any] = {
        "command": "pairopt bench " + " ".join(argv),
        "environment": environment(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model": asdict(shape),
        "options": asdict(opts),
        "wall_s": time.perf_counter() - started,
        "profiles": [asdict(r) for r in results],
    }
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    (args.out / "bench.txt").write_text(table + "\n")
    print(f"wrote {args.out / 'bench.json'}")
    if not args.no_png:
        title = f"pairopt bench ({report['environment'].get('gpu', 'CPU')}, {report['dtype']})"
        if write_chart(results, args.out / "bench.png", title):
            print(f"wrote {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
