"""`pairopt bench`: the command line (options, checks, output files); see pairopt/bench/run.py."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pairopt.bench import peer
from pairopt.bench.checks import (
    check_numbers,
    check_shape,
    check_tokenizer_dir,
    parse_vocabs,
    resolve_dtype,
)
from pairopt.bench.data import PROFILES_PATH, dataset_lengths, load_group_profiles, load_profiles
from pairopt.bench.groups import GROUP_PAIRS, run_groups
from pairopt.bench.measure import memory_sweep
from pairopt.bench.model import GPU_SHAPE, ModelShape
from pairopt.bench.report import environment, format_group_table, format_table, write_chart
from pairopt.bench.run import MODES, BenchOptions, draw_batches, run_batches
from pairopt.engine.attention import BACKENDS
from pairopt.engine.devices import check_flex_device, resolve_device
from pairopt.errors import PairoptError


def _parser() -> argparse.ArgumentParser:
    d, s = BenchOptions(), ModelShape()
    p = argparse.ArgumentParser(
        prog="pairopt bench",
        description="Step time of unshared/shared x padded/packed, side by side; "
        "see docs/benchmarks.md.",
    )
    p.add_argument(
        "--profiles",
        default=None,
        help="comma-separated profile names, all, or none (default: all, or none when "
        "--group-profiles is given)",
    )
    p.add_argument(
        "--group-profiles",
        default=None,
        help="comma-separated group profiles (k responses per prompt), or all: group-shared vs "
        "pair-shared vs unshared on the same pairs (pairopt/bench/groups.py)",
    )
    p.add_argument(
        "--group-pairs",
        default=",".join(GROUP_PAIRS),
        help="the pairs of each prompt in group profiles: all, best_worst, or both",
    )
    p.add_argument("--groups-per-step", type=int, default=2, help="prompts per step (groups)")
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


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PairoptError(f"--out {out}: cannot make the output directory ({err}).") from err


def sweep_memory(args: argparse.Namespace, argv: list[str], device: torch.device) -> int:
    """`--memory-sweep`: LM-head peak memory, chunked vs full logits, per vocabulary size."""
    vocabs = parse_vocabs(args.memory_sweep)
    _make_out(args.out)
    rows = memory_sweep(
        vocabs, args.hidden, args.sweep_tokens, args.chunk_size, args.chunk_elements, str(device)
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


def sources_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """--data (one source of real lengths) or --profiles (each a length profile)."""
    if args.data is not None:
        return {args.data.stem: dataset_lengths(args.data, args.tokenizer)}
    chosen = args.profiles or ("none" if args.group_profiles else "all")
    if chosen == "none":
        return {}
    return _pick(load_profiles(args.profiles_file), chosen, "--profiles")


def group_sources_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """--group-profiles: the group profiles named (none by default)."""
    if not args.group_profiles:
        return {}
    return _pick(load_group_profiles(args.profiles_file), args.group_profiles, "--group-profiles")


def _pick(profiles: dict[str, Any], chosen: str, option: str) -> dict[str, Any]:
    names = list(profiles) if chosen == "all" else [n.strip() for n in chosen.split(",")]
    bad = [n for n in names if n not in profiles]
    if bad:
        raise PairoptError(
            f"{option}: unknown {', '.join(bad)}; choose from {', '.join(profiles)} or all."
        )
    return {n: profiles[n] for n in names}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--peer" in argv:  # the peer has its own options
        return peer.main([a for a in argv if a != "--peer"])
    args = _parser().parse_args(argv)
    check_numbers(args)  # before anything is built or written
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_sweep:
        return sweep_memory(args, argv, device)
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
    drawn = draw_batches(opts, shape, sources_from_args(args))
    group_sources = group_sources_from_args(args)
    group_pairs = [h.strip() for h in args.group_pairs.split(",") if h.strip()]
    if not drawn and not group_sources:
        raise PairoptError("nothing to measure: name --profiles or --group-profiles.")
    if any(h not in GROUP_PAIRS for h in group_pairs) or not group_pairs:
        raise PairoptError(
            f"--group-pairs {args.group_pairs!r}: choose from {', '.join(GROUP_PAIRS)}."
        )
    _make_out(args.out)
    started = time.perf_counter()
    results = run_batches(opts, shape, drawn, device, dtype) if drawn else []
    groups = run_groups(
        opts, shape, group_sources, group_pairs, args.groups_per_step, device, dtype
    )
    tables = ([format_table(results)] if results else []) + (
        [format_group_table(groups)] if groups else []
    )
    table = "\n\n".join(tables)
    print(table)
    report: dict[str, Any] = {
        "command": "pairopt bench " + " ".join(argv),
        "environment": environment(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model": asdict(shape),
        "options": asdict(opts),
        "wall_s": time.perf_counter() - started,
        "profiles": [asdict(r) for r in results],
        "group_profiles": [asdict(r) for r in groups],
    }
    if groups:
        report["group_options"] = {"pairs": group_pairs, "groups_per_step": args.groups_per_step}
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    (args.out / "bench.txt").write_text(table + "\n")
    print(f"wrote {args.out / 'bench.json'}")
    if not args.no_png and results:
        title = f"pairopt bench ({report['environment'].get('gpu', 'CPU')}, {report['dtype']})"
        if write_chart(results, args.out / "bench.png", title):
            print(f"wrote {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
