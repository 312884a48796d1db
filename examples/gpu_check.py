"""One-GPU check, in one go (< 8 minutes on one H100 / H200):

    python examples/gpu_check.py --out gpu-out

Needs torch (CUDA build, >= 2.10 for torch's varlen kernel), transformers 5.x, accelerate and
Triton (FlexAttention); not pydantic, datasets, matplotlib or flash-attn (each is used when
present: flash-attn by the varlen backend, matplotlib for the chart).

1. bf16 exactness of flex and varlen against sdpa. A Llama of the bench's GPU shape cut to 4
   layers, random weights; 6 pairs (3 hh-rlhf-like, 3 ultrafeedback-like). Reference: the
   classic computation (unshared, padded, sdpa) in fp32 with the same weights. For every bf16
   run we report the summed log-prob error per token (|d sum| / n, nats) and the relative error
   of three parameter gradients (||g - g_ref|| / ||g_ref||). Tolerance: a backend may be at most
   twice as far from the fp32 reference as the plain bf16 computation (sdpa, unshared, padded)
   is, plus 1e-3 nats per token and 1e-2 relative gradient error.
2. `pairopt bench` on all six profiles, GPU shape (hidden 2048, 16 layers, 16 heads / 4 KV heads,
   intermediate 5632, vocab 32000), bf16, 8 pairs per step, 1 warm-up + 5 measured rounds,
   backend auto, rows padded to a multiple of 64 tokens.
3. Backends side by side (flex vs varlen) on two profiles for the packed modes: the measurement
   behind the auto rule. Compilations are counted (torch._dynamo's unique graphs).

Every section is guarded: a failure is recorded and the next section runs. Results go to
OUT/gpu_check.json (+ the bench's bench.json / bench.txt / bench.png).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from pairopt.bench import data as bench_data
from pairopt.bench import model as bench_model
from pairopt.bench import run as bench
from pairopt.bench.report import environment, format_table, write_chart
from pairopt.engine.forward import compute_logps

BUDGET_S = 7 * 60  # leave a minute of the 8 for start-up and the last section's tail
STARTED = time.perf_counter()
# --smoke runs every section on the CPU with a tiny model: it checks the script, not the GPU
DEVICE, SHAPE, DTYPE = "cuda", bench_model.GPU_SHAPE, torch.bfloat16
SMOKE_SHAPE = bench_model.ModelShape(
    hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vocab=128
)


def elapsed() -> float:
    return time.perf_counter() - STARTED


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. exactness


def exactness() -> dict[str, Any]:
    shape = dataclasses.replace(SHAPE, layers=min(4, SHAPE.layers))
    model32 = bench_model.build_model(shape, DEVICE, torch.float32, seed=0)
    model16 = copy.deepcopy(model32).to(DTYPE)
    profiles = bench_data.load_profiles()
    rng = random.Random(0)
    lengths = bench_data.profile_lengths(profiles["hh_rlhf"], 3, 0.25, rng)
    lengths += bench_data.profile_lengths(profiles["ultrafeedback"], 3, 0.25, rng)
    (pairs,) = bench_data.make_batches(lengths, 6, shape.vocab, seed=0)
    watched = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    watched.append(f"model.layers.{shape.layers - 1}.mlp.down_proj.weight")

    def run(model: Any, backend: str, share: bool, pack: bool) -> dict[str, Any]:
        model.zero_grad(set_to_none=True)
        out = compute_logps(model, pairs, share_prefix=share, packing=pack, backend=backend)
        (out.chosen_logps.sum() + out.rejected_logps.sum()).backward()
        params = dict(model.named_parameters())
        return {
            "logps": torch.cat([out.chosen_logps, out.rejected_logps]).detach().float(),
            "tokens": torch.cat([out.chosen_tokens, out.rejected_tokens]).float(),
            "grads": {n: params[n].grad.detach().float().clone() for n in watched},
        }

    def error(got: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
        per_token = ((got["logps"] - ref["logps"]).abs() / ref["tokens"]).max().item()
        grad = max(
            ((got["grads"][n] - ref["grads"][n]).norm() / ref["grads"][n].norm()).item()
            for n in watched
        )
        return {"logp_err_per_token": per_token, "grad_rel_err": grad}

    log("exactness: fp32 reference (sdpa, unshared, padded)")
    ref = run(model32, "sdpa", False, False)
    runs = [
        ("sdpa", False, False),  # the plain bf16 computation: the noise floor
        ("sdpa", True, True),
        ("flex", True, True),
        ("flex", False, True),
        ("varlen", True, True),
        ("varlen", False, True),
    ]
    results: dict[str, Any] = {"tolerance": "err <= 2 * floor + (1e-3 nats/token, 1e-2 rel grad)"}
    floor: dict[str, float] | None = None
    bf16_sdpa: dict[str, Any] | None = None
    for backend, share, pack in runs:
        name = f"{backend} {'shared' if share else 'unshared'}-{'packed' if pack else 'padded'}"
        try:
            before = bench.compile_count()
            start = time.perf_counter()
            got = run(model16, backend, share, pack)
            row: dict[str, Any] = dict(error(got, ref))
            row["seconds_incl_compile"] = time.perf_counter() - start
            row["compiles"] = bench.compile_count() - before
            if floor is None:
                floor, bf16_sdpa = dict(row), got
            else:
                assert bf16_sdpa is not None
                row["vs_bf16_sdpa"] = error(got, bf16_sdpa)
            row["pass"] = (
                row["logp_err_per_token"] <= 2 * floor["logp_err_per_token"] + 1e-3
                and row["grad_rel_err"] <= 2 * floor["grad_rel_err"] + 1e-2
            )
        except Exception as err:  # record and go on: the other backends still tell something
            row = {"error": f"{type(err).__name__}: {err}", "pass": False}
            traceback.print_exc()
        results[name] = row
        log(f"exactness: {name}: {json.dumps(row)}")
    return results


# ----------------------------------------------------------------------------- 2. bench


def bench_six(out: Path) -> dict[str, Any]:
    # the CPU table's layout (rows to a multiple of 64): varlen, auto's choice where torch's
    # varlen kernel exists, compiles nothing; flex, if auto falls back to it, recompiles until
    # dynamic shapes take over (counted per mode)
    opts = bench.BenchOptions(pairs_per_step=8, steps=5, warmup=1)
    if DEVICE == "cpu":
        opts = dataclasses.replace(opts, pairs_per_step=2, steps=1)
    profiles = bench_data.load_profiles()
    model = bench_model.build_model(SHAPE, DEVICE, DTYPE, opts.seed)
    results = []
    n = (opts.warmup + opts.steps) * opts.pairs_per_step
    for i, (name, profile) in enumerate(profiles.items()):
        if elapsed() > BUDGET_S - 60:
            log(f"bench: time budget reached, {name} and later profiles skipped")
            break
        lengths = bench_data.profile_lengths(profile, n, opts.jitter, random.Random(opts.seed + i))
        batches = bench_data.make_batches(lengths, opts.pairs_per_step, SHAPE.vocab, opts.seed + i)
        results.append(bench.run_profile(name, model, batches, opts, log))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    table = format_table(results)
    print(table, flush=True)
    device = torch.device(DEVICE)
    report: dict[str, Any] = {
        "command": "python examples/gpu_check.py (section 2)",
        "environment": environment(device),
        "dtype": str(DTYPE).removeprefix("torch."),
        "model": dataclasses.asdict(SHAPE),
        "options": dataclasses.asdict(opts),
        "auto_backend": _auto_name(model),
        "profiles": [dataclasses.asdict(r) for r in results],
    }
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.txt").write_text(table + "\n")
    gpu = report["environment"].get("gpu", "CPU smoke run")
    write_chart(results, out / "bench.png", f"pairopt bench ({gpu}, {report['dtype']})")
    return report


def _auto_name(model: Any) -> str:
    from pairopt.engine.attention import auto_backend

    return auto_backend(model)


# ----------------------------------------------------------------------------- 3. backends


def backends(out: Path) -> dict[str, Any]:
    model = bench_model.build_model(SHAPE, DEVICE, DTYPE, 0)
    profiles = bench_data.load_profiles()
    rows: dict[str, Any] = {}
    for name in ("capybara", "hh_rlhf"):
        for backend in ("varlen", "flex") if DEVICE == "cuda" else ("varlen", "sdpa"):
            if elapsed() > BUDGET_S:
                log("backends: time budget reached, the rest skipped")
                return rows
            opts = bench.BenchOptions(
                modes=("unshared-packed", "shared-packed"),
                pairs_per_step=8,
                steps=3,
                warmup=1,
                backend=backend,
                bucket_size=1024,  # the same layouts for both; flex sees a few shapes
                measure_memory=False,
            )
            if DEVICE == "cpu":
                opts = dataclasses.replace(opts, pairs_per_step=2, steps=1)
            n = opts.pairs_per_step * (opts.steps + opts.warmup)
            lengths = bench_data.profile_lengths(profiles[name], n, opts.jitter, random.Random(7))
            batches = bench_data.make_batches(lengths, opts.pairs_per_step, SHAPE.vocab, 7)
            key = f"{name}/{backend}"
            try:
                res = bench.run_profile(key, model, batches, opts, log)
                rows[key] = {
                    m: {"step_s": r.step_s, "compiles": r.compiles} for m, r in res.modes.items()
                }
            except Exception as err:
                rows[key] = {"error": f"{type(err).__name__}: {err}"}
                traceback.print_exc()
            log(f"backends: {key}: {json.dumps(rows[key])}")
    return rows


def main(argv: list[str] | None = None) -> int:
    global DEVICE, SHAPE, DTYPE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-out"))
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: 1,2,3")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: test the script")
    args = parser.parse_args(argv)
    if args.smoke:
        DEVICE, SHAPE, DTYPE = "cpu", SMOKE_SHAPE, torch.float32
    elif not torch.cuda.is_available():
        print("no CUDA device: this script is for a GPU machine (--smoke runs it on the CPU)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    report: dict[str, Any] = {"environment": environment(torch.device(DEVICE))}
    try:
        import triton

        report["environment"]["triton"] = triton.__version__
    except ImportError:
        report["environment"]["triton"] = None
    sections = {
        "1": ("exactness", exactness),
        "2": ("bench", lambda: bench_six(args.out)),
        "3": ("backends", lambda: backends(args.out)),
    }
    for number, (key, section) in sections.items():
        if number in skip:
            continue
        try:
            report[key] = section()
        except Exception as err:  # record it; the next section still runs
            report[key] = {"error": f"{type(err).__name__}: {err}"}
            traceback.print_exc()
        report["total_compiles"] = bench.compile_count()
        report["elapsed_s"] = elapsed()
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    log(f"done in {elapsed():.0f}s; wrote {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
