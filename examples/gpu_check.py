"""One-GPU check, in one go, that a rare 15-minute device cannot waste (docs/benchmarks.md, GPU):

    export PYTHONPATH="$PWD"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    timeout -k 10 420 python3 examples/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/log.txt"

Needs torch (CUDA build; >= 2.10 for torch's varlen kernel), transformers 5.x and Triton; not
pairopt installed, pydantic, datasets, matplotlib or flash-attn (each is used when present:
flash-attn by the varlen backend if a tiny call runs, matplotlib for the chart). The script puts
the repository root on sys.path itself.

Sections, each in a child process of its own, so a crash, an out-of-memory or a hang in one
cannot take the others down:

1. `exactness`: bf16 log-probs and gradients of flex and varlen (shared-packed and
   unshared-packed) against the classic computation (sdpa, unshared, padded) in fp32, on the
   bench's GPU shape cut to 4 layers, 6 pairs. Per row: the summed log-prob error per token
   (|d sum| / n, nats) and the largest relative error of three parameter gradients. The noise
   floor is the plain bf16 computation (sdpa unshared-padded); a row passes when it is at most
   twice the floor plus 1e-3 nats per token and 1e-2 relative gradient error. No floor (its row
   failed): no row passes.
2. `bench`: `pairopt bench` on the six profiles (GPU shape: hidden 2048, 16 layers, 16 heads /
   4 KV heads, vocabulary 32000; bf16, 8 pairs per step, 1 warm-up + 5 measured rounds, backend
   auto, rows to a multiple of 64). Each profile is guarded and written as soon as it finishes.
3. `backends`: flex against varlen on the packed modes of two profiles, with compile counts.

Time: a hard budget overall (--budget, default 360 s, so a rerun fits a 15-minute lease) and per
section (the child is killed past its share); inside a section a watchdog stops an item that
runs past --item-timeout and the next item runs. Results are written as they finish:
OUT/<section>.json per section, OUT/gpu_check.json merged, OUT/bench.{json,txt,png}. A compact
summary is printed last. Exit code 0 only if every section finished and every exactness row
passed; 1 otherwise.

`--smoke` runs every section on the CPU with a tiny model (it tests the script, not the GPU);
there flex is checked forward-only with torch.compile off (FlexAttention has no CPU backward),
which still exercises its BlockMask and mask_mod. `--fail SECTION[:ITEM[:hang]]` makes a section
or one of its items fail (or hang) on purpose: the tests use it to check the guards.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the device machine has no pairopt installed
    sys.path.insert(0, str(ROOT))

SECTIONS = ("exactness", "bench", "backends")
SHARE = {"exactness": 0.40, "bench": 0.40, "backends": 0.20}  # of the overall budget
GRACE_S = 20  # a child past its share gets this long to stop before it is killed
EXACT_TOL = {"logp_err_per_token": 1e-3, "grad_rel_err": 1e-2}  # plus twice the floor


class ItemTimeout(Exception):
    pass


# ----------------------------------------------------------------------------- the parent


def run_sections(args: argparse.Namespace) -> int:
    """Each selected section in a child process, within the budget; then the summary."""
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": environment(args.smoke), "sections": {}}
    selected = [s for s in SECTIONS if s in args.sections]
    for section in selected:
        left = args.budget - (time.time() - started)
        if left < 10:
            report["sections"][section] = {"status": "skipped", "error": "overall budget spent"}
            continue
        limit = min(left, SHARE[section] * args.budget + carry(selected, section, started, args))
        report["sections"][section] = run_child(section, args, limit)
        report["elapsed_s"] = time.time() - started
        write_json(args.out / "gpu_check.json", report)
    report["elapsed_s"] = time.time() - started
    report["total_compiles"] = sum(r.get("total_compiles", 0) for r in report["sections"].values())
    report["verdict"] = verdict(report)
    write_json(args.out / "gpu_check.json", report)
    print(summary(report, args.budget), flush=True)
    return 0 if not report["verdict"] else 1


def carry(selected: list[str], section: str, started: float, args: argparse.Namespace) -> float:
    """Budget the earlier sections left unused passes on to the next one."""
    done = selected[: selected.index(section)]
    planned = sum(SHARE[s] * args.budget for s in done)
    return max(0.0, planned - (time.time() - started))


def run_child(section: str, args: argparse.Namespace, limit: float) -> dict[str, Any]:
    """Run one section in a child process; its result file, whatever happened to it."""
    path = args.out / f"{section}.json"
    path.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--section",
        section,
        "--out",
        str(args.out),
        "--deadline",
        str(time.time() + limit),
        "--item-timeout",
        str(args.item_timeout),
        "--fail",
        args.fail,
    ] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ)
    if args.smoke:
        env["TORCHDYNAMO_DISABLE"] = "1"  # flex forward on the CPU without a minute of compiling
    log(f"{section}: started (limit {limit:.0f} s)")
    try:
        done = subprocess.run(command, env=env, timeout=limit + GRACE_S, check=False)
        code: int | str = done.returncode
    except subprocess.TimeoutExpired:
        code = "killed"
    result = read_json(path) or {"items": {}}
    if code == "killed":
        result.update(status="killed", error=f"past its limit of {limit:.0f} s + {GRACE_S} s")
    elif result.get("status") in (None, "running"):  # died without saying why
        result.update(status="crashed", error=f"the child exited with {code} before finishing")
    log(f"{section}: {result.get('status')}")
    return result


def verdict(report: dict[str, Any]) -> list[str]:
    """What failed: sections that did not finish, items with errors, exactness rows that did
    not pass. Empty means the check passed."""
    failed = []
    for section, result in report["sections"].items():
        if result.get("status") not in ("done", None):
            failed.append(f"{section}: {result.get('status')} ({result.get('error', '')})")
        for item, row in result.get("items", {}).items():
            if "error" in row:
                failed.append(f"{section} {item}: {row['error']}")
            elif section == "exactness" and row.get("pass") is False:
                failed.append(f"exactness {item}: did not pass")
    return failed


def summary(report: dict[str, Any], budget: float) -> str:
    env = report["environment"]
    lines = [
        "",
        "=== pairopt GPU check: summary ===",
        f"card: {env.get('gpu', 'none (CPU smoke run)')} {env.get('gpu_memory', '')}".rstrip(),
        "versions: "
        + ", ".join(
            f"{k} {env.get(k)}"
            for k in ("torch", "cuda", "transformers", "triton", "flash_attn", "python")
        ),
    ]
    sections = report["sections"]
    exact = sections.get("exactness", {})
    if exact:
        lines.append(f"exactness [{exact.get('status')}] (pass: <= 2 x floor + {EXACT_TOL}):")
        for name, row in exact.get("items", {}).items():
            if "error" in row:
                lines.append(f"  {name:<30} ERROR {row['error'][:90]}")
            elif "logp_err_per_token" in row:
                grad = row.get("grad_rel_err")
                lines.append(
                    f"  {name:<30} logp/token {row['logp_err_per_token']:.2e}  grad "
                    + ("n/a     " if grad is None else f"{grad:.2e}")
                    + f"  compiles {row.get('compiles', 0):>3}  "
                    + {True: "PASS", False: "FAIL", None: "-"}[row.get("pass")]
                )
    bench = sections.get("bench", {})
    if bench:
        lines.append(f"bench [{bench.get('status')}] (shared-packed vs best unshared):")
        for name, row in bench.get("items", {}).items():
            if "error" in row:
                lines.append(f"  {name:<15} ERROR {row['error'][:90]}")
            elif "speedup" in row:
                lines.append(
                    f"  {name:<15} x{row['speedup']:.3f} of ideal x{row['ideal']:.3f} = "
                    f"{100 * row['fraction_of_ideal']:.0f}%  compiles {row['compiles']}"
                    f"  ({row['attn_implementation']})"
                )
    backends = sections.get("backends", {})
    if backends:
        lines.append(f"backends [{backends.get('status')}] (packed modes, median step s):")
        for name, row in backends.get("items", {}).items():
            if "error" in row:
                lines.append(f"  {name:<22} ERROR {row['error'][:90]}")
                continue
            steps = ", ".join(
                f"{mode} {r['step_s']:.3f} s ({r['compiles']} compiles)" for mode, r in row.items()
            )
            lines.append(f"  {name:<22} {steps}")
    lines.append(f"compiles in all: {report.get('total_compiles', 'n/a')}")
    lines.append(f"elapsed: {report.get('elapsed_s', 0):.0f} s of a {budget:.0f} s budget")
    failed = report.get("verdict") or []
    lines.append("verdict: PASS" if not failed else "verdict: FAIL")
    lines += [f"  - {f[:150]}" for f in failed]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a child


class Section:
    """One section's items, each under a watchdog, written to OUT/<section>.json as it ends."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.path = args.out / f"{name}.json"
        self.result: dict[str, Any] = {"status": "running", "items": {}}
        self.write()

    def write(self) -> None:
        write_json(self.path, self.result)

    def left(self) -> float:
        return self.args.deadline - time.time()

    def item(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run one item: its row, or None when it failed (recorded) or was skipped."""
        if self.left() < 5:
            self.result["items"][name] = {"error": "skipped: the section's time is spent"}
            self.write()
            return None
        limit = min(self.args.item_timeout, self.left())
        try:
            with watchdog(limit):
                inject(self.args.fail, self.name, name)
                row = fn()
        except ItemTimeout:
            row = {"error": f"timed out after {limit:.0f} s (watchdog)"}
        except Exception as err:  # record and go on: the other items still tell something
            traceback.print_exc()
            row = {"error": f"{type(err).__name__}: {err}"[:500]}
        self.result["items"][name] = row
        self.write()
        log(f"{self.name}: {name}: {json.dumps(row)[:200]}")
        return None if "error" in row else row

    def finish(self, **extra: Any) -> None:
        self.result.update(extra, status="done")
        self.write()


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Raise ItemTimeout in the main thread after `seconds` (a Python-level hang or a long
    compile; a hang inside one C call is caught by the parent's kill instead)."""

    def expire(signum: int, frame: Any) -> None:
        raise ItemTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def inject(fail: str, section: str, item: str) -> None:
    """--fail SECTION (the section raises), SECTION:ITEM (that item raises) or
    SECTION:ITEM:hang (that item hangs until the watchdog stops it). For the tests."""
    target, _, rest = fail.partition(":")
    if not fail or target != section:
        return
    which, _, how = rest.partition(":")
    if which != item:
        return
    if how == "hang":
        while True:
            time.sleep(0.1)
    raise RuntimeError(f"--fail {fail}: fails on purpose")


def setting(smoke: bool) -> tuple[str, Any, Any]:
    """(device, model shape, dtype): the GPU shape in bf16, or a tiny fp32 model (--smoke)."""
    import torch

    from pairopt.bench import model as bench_model

    if smoke:
        tiny = bench_model.ModelShape(
            hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vocab=128
        )
        return "cpu", tiny, torch.float32
    return "cuda", bench_model.GPU_SHAPE, torch.bfloat16


def compile_count() -> int:
    from pairopt.bench.run import compile_count as count

    return count()


# ----------------------------------------------------------------------------- 1. exactness


def exactness(section: Section, smoke: bool) -> None:
    import torch

    from pairopt.bench import data as bench_data
    from pairopt.bench import model as bench_model
    from pairopt.engine.forward import compute_logps

    device, shape, dtype = setting(smoke)
    shape = dataclasses.replace(shape, layers=min(4, shape.layers))
    model32 = bench_model.build_model(shape, device, torch.float32, seed=0)
    model16 = copy.deepcopy(model32).to(dtype)
    profiles = bench_data.load_profiles()
    rng = random.Random(0)
    lengths = bench_data.profile_lengths(profiles["hh_rlhf"], 3, 0.25, rng)
    lengths += bench_data.profile_lengths(profiles["ultrafeedback"], 3, 0.25, rng)
    if smoke:
        lengths = [(max(2, p // 8), max(1, c // 8), max(1, r // 8)) for p, c, r in lengths]
    (pairs,) = bench_data.make_batches(lengths, 6, shape.vocab, seed=0)
    watched = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    watched.append(f"model.layers.{shape.layers - 1}.mlp.down_proj.weight")

    def run(model: Any, backend: str, share: bool, pack: bool, grad: bool) -> dict[str, Any]:
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            out = compute_logps(model, pairs, share_prefix=share, packing=pack, backend=backend)
        got: dict[str, Any] = {
            "logps": torch.cat([out.chosen_logps, out.rejected_logps]).detach().float(),
            "tokens": torch.cat([out.chosen_tokens, out.rejected_tokens]).float(),
        }
        if grad:
            (out.chosen_logps.sum() + out.rejected_logps.sum()).backward()
            params = dict(model.named_parameters())
            got["grads"] = {n: params[n].grad.detach().float().clone() for n in watched}
        return got

    def error(got: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
        per_token = ((got["logps"] - ref["logps"]).abs() / ref["tokens"]).max().item()
        grad = None
        if "grads" in got:
            grad = max(
                ((got["grads"][n] - ref["grads"][n]).norm() / ref["grads"][n].norm()).item()
                for n in watched
            )
        return {"logp_err_per_token": per_token, "grad_rel_err": grad}

    reference: dict[str, Any] = {}

    def fp32_reference() -> dict[str, Any]:
        reference.update(run(model32, "sdpa", False, False, True))
        return {"pairs": len(pairs), "tokens": int(reference["tokens"].sum())}

    if section.item("fp32 reference", fp32_reference) is None:
        section.finish(note="no fp32 reference: no row can be judged")
        return
    floor: dict[str, Any] = {}
    runs = [("sdpa", False, False), ("sdpa", True, True), ("flex", True, True)]
    runs += [("flex", False, True), ("varlen", True, True), ("varlen", False, True)]
    for backend, share, pack in runs:
        layout = f"{'shared' if share else 'unshared'}-{'packed' if pack else 'padded'}"
        grad = not (smoke and backend == "flex")  # FlexAttention has no CPU backward
        name = f"{backend} {layout}" + ("" if grad else " (forward)")

        def measure(b: str = backend, s: bool = share, p: bool = pack, g: bool = grad) -> dict:
            before, start = compile_count(), time.perf_counter()
            row: dict[str, Any] = error(run(model16, b, s, p, g), reference)
            row["seconds_incl_compile"] = time.perf_counter() - start
            row["compiles"] = compile_count() - before
            if not floor and (b, s, p) == ("sdpa", False, False):
                floor.update(row)  # the plain computation in this dtype: the noise floor
            row["pass"] = passes(row, floor)
            return row

        section.item(name, measure)
    section.finish(floor=floor or None, total_compiles=compile_count())


def passes(row: dict[str, Any], floor: dict[str, Any]) -> bool:
    if not floor:
        return False
    for key, tol in EXACT_TOL.items():
        value, base = row.get(key), floor.get(key)
        if value is None:  # forward-only row: no gradient to judge
            continue
        if base is None or value > 2 * base + tol:
            return False
    return True


# ----------------------------------------------------------------------------- 2. bench


def bench(section: Section, smoke: bool) -> None:
    import torch

    from pairopt.bench import data as bench_data
    from pairopt.bench import model as bench_model
    from pairopt.bench import run as bench_run
    from pairopt.bench.report import format_table, write_chart

    device, shape, dtype = setting(smoke)
    opts = bench_run.BenchOptions(pairs_per_step=8, steps=5, warmup=1)
    if smoke:
        opts = dataclasses.replace(opts, pairs_per_step=2, steps=1, measure_memory=False)
    profiles = bench_data.load_profiles()
    model = bench_model.build_model(shape, device, dtype, opts.seed)
    results = []
    n = (opts.warmup + opts.steps) * opts.pairs_per_step
    for i, (name, profile) in enumerate(profiles.items()):

        def one(i: int = i, name: str = name, profile: dict = profile) -> dict[str, Any]:
            lengths = bench_data.profile_lengths(profile, n, opts.jitter, random.Random(i))
            if smoke:
                lengths = [
                    (max(2, p // 16), max(1, c // 16), max(1, r // 16)) for p, c, r in lengths
                ]
            batches = bench_data.make_batches(lengths, opts.pairs_per_step, shape.vocab, i)
            res = bench_run.run_profile(name, model, batches, opts, log)
            results.append(res)
            sp = res.modes["shared-packed"]
            return {
                "speedup": sp.speedup[res.best_baseline],
                "ideal": res.ideal_speedup,
                "fraction_of_ideal": sp.fraction_of_ideal,
                "best_baseline": res.best_baseline,
                "compiles": sum(m.compiles for m in res.modes.values()),
                "attn_implementation": sp.attn_implementation,
                "modes": {m: dataclasses.asdict(r) for m, r in res.modes.items()},
            }

        section.item(name, one)
        if device == "cuda":
            torch.cuda.empty_cache()
    extra: dict[str, Any] = {"auto_backend": auto_name(model)}
    if results:
        table = format_table(results)
        print(table, flush=True)
        (section.args.out / "bench.txt").write_text(table + "\n")
        write_json(
            section.args.out / "bench.json",
            {
                "command": "python examples/gpu_check.py (bench)",
                "environment": environment(smoke),
                "dtype": str(dtype).removeprefix("torch."),
                "model": dataclasses.asdict(shape),
                "options": dataclasses.asdict(opts),
                "profiles": [dataclasses.asdict(r) for r in results],
            },
        )
        try:  # a chart failure is a note, never the section's result
            title = f"pairopt bench ({environment(smoke).get('gpu', 'CPU smoke run')})"
            write_chart(results, section.args.out / "bench.png", title)
        except Exception as err:
            extra["chart_error"] = f"{type(err).__name__}: {err}"
    section.finish(**extra, total_compiles=compile_count())


def auto_name(model: Any) -> str:
    from pairopt.engine.attention import auto_backend

    return auto_backend(model)


# ----------------------------------------------------------------------------- 3. backends


def backends(section: Section, smoke: bool) -> None:
    from pairopt.bench import data as bench_data
    from pairopt.bench import model as bench_model
    from pairopt.bench import run as bench_run

    device, shape, dtype = setting(smoke)
    model = bench_model.build_model(shape, device, dtype, 0)
    profiles = bench_data.load_profiles()
    for name in ("capybara", "hh_rlhf"):
        for backend in ("varlen", "sdpa") if smoke else ("varlen", "flex"):
            opts = bench_run.BenchOptions(
                modes=("unshared-packed", "shared-packed"),
                pairs_per_step=2 if smoke else 8,
                steps=1 if smoke else 3,
                warmup=1,
                backend=backend,
                bucket_size=1024,  # the same layouts for both; flex sees a few shapes
                measure_memory=False,
            )

            def one(name: str = name, opts: Any = opts) -> dict[str, Any]:
                n = opts.pairs_per_step * (opts.steps + opts.warmup)
                lengths = bench_data.profile_lengths(
                    profiles[name], n, opts.jitter, random.Random(7)
                )
                if smoke:
                    lengths = [
                        (max(2, p // 16), max(1, c // 16), max(1, r // 16)) for p, c, r in lengths
                    ]
                batches = bench_data.make_batches(lengths, opts.pairs_per_step, shape.vocab, 7)
                res = bench_run.run_profile(f"{name}/{opts.backend}", model, batches, opts, log)
                return {
                    m: {"step_s": r.step_s, "compiles": r.compiles} for m, r in res.modes.items()
                }

            section.item(f"{name}/{backend}", one)
    section.finish(total_compiles=compile_count())


# ----------------------------------------------------------------------------- helpers


def environment(smoke: bool) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version()}
    try:
        import torch
        import transformers

        env.update(torch=torch.__version__, transformers=transformers.__version__)
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available() and not smoke:
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = props.name
            env["gpu_memory"] = f"({props.total_memory / 2**30:.0f} GiB)"
    except Exception as err:  # the summary must still print
        env["error"] = f"{type(err).__name__}: {err}"
    for module in ("triton", "flash_attn"):
        try:
            env[module] = __import__(module).__version__
        except Exception:
            env[module] = None
    return env


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-out"))
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--budget", type=float, default=360.0, help="seconds for everything")
    parser.add_argument("--item-timeout", type=float, default=120.0, help="seconds per item")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: test the script")
    parser.add_argument(
        "--fail", default="", help="SECTION[:ITEM[:hang]]: fail (or hang) on purpose, for tests"
    )
    parser.add_argument("--section", help=argparse.SUPPRESS)  # a child: run this section
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if bad := [s for s in args.sections if s not in SECTIONS]:
        parser.error(f"--sections: unknown {bad}; choose from {SECTIONS}")
    if args.section is None:
        if not args.smoke:
            import torch

            if not torch.cuda.is_available():
                print(
                    "no CUDA device: this script is for a GPU machine (--smoke runs it on the CPU)"
                )
                return 2
        return run_sections(args)
    section = Section(args.section, args)
    section_fn = {"exactness": exactness, "bench": bench, "backends": backends}[args.section]
    try:
        inject(args.fail, args.section, "")
        section_fn(section, args.smoke)
    except Exception as err:  # the section itself broke: record it, the parent goes on
        traceback.print_exc()
        section.result.update(status="error", error=f"{type(err).__name__}: {err}"[:500])
        section.write()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
