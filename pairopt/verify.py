"""`pairopt verify --model NAME_OR_PATH`: is the shared forward exact for this model?

Scores a few random pairs the classic way (one plain forward per prompt + response, the
model's own attention and mask, full logits) and with the engine on every backend available
here, shared and packed; prints the largest difference per backend and layout and exits 1 if
any exceeds the tolerance. Run it before trusting the speed-up on a new architecture.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from torch import nn

from pairopt.engine.attention import BACKENDS, resolve_backend
from pairopt.engine.compat import check_shareable
from pairopt.engine.devices import check_flex_device, resolve_device
from pairopt.engine.forward import compute_response_logps
from pairopt.errors import PairoptError
from pairopt.pairs import ResponseGroup
from pairopt.training.models import load_causal_lm

# (atol, rtol) per dtype: fp32 sums of ~100 log-probs carry ~1e-5 of rounding; half precision
# kernels accumulate differently (block order, fused softmax), ~1% of a summed log-prob.
TOLERANCES = {
    torch.float64: (1e-8, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (0.5, 2e-2),
    torch.float16: (0.2, 1e-2),
}
LAYOUTS = {  # name -> (share_prefix, packing)
    "shared+packed": (True, True),
    "shared": (True, False),
    "unshared+packed": (False, True),
}


def random_groups(vocab: int, n: int, seed: int, k: int = 2) -> list[ResponseGroup]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(0, vocab, (length,), generator=g).tolist()

    return [ResponseGroup(ids(8, 48), [ids(1, 24) for _ in range(k)]) for _ in range(n)]


@torch.no_grad()
def naive_logps(model: nn.Module, groups: Sequence[ResponseGroup]) -> torch.Tensor:
    """(G, k): the classic computation, one plain forward per response, the model's own mask."""
    device = next(model.parameters()).device
    out = torch.zeros(len(groups), len(groups[0].responses), dtype=torch.float64)
    for i, group in enumerate(groups):
        P = len(group.prompt)
        for j, response in enumerate(group.responses):
            ids = torch.tensor([list(group.prompt) + list(response)], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, P - 1 : -1].float()
            picked = logits.log_softmax(-1).gather(
                -1, torch.tensor(response, device=device)[:, None]
            )
            out[i, j] = picked.sum().double()
    return out


def available_backends(model: nn.Module) -> list[str]:
    """Backends that can run here. Flex only on CUDA: its CPU path is forward-only and its
    inductor CPU template took a minute to compile and failed for some head sizes (torch 2.13)."""
    usable = []
    cuda = next(model.parameters()).is_cuda
    for backend in BACKENDS:
        if backend == "flex" and not cuda:
            continue
        try:
            resolve_backend(model, backend)
        except PairoptError:
            continue
        usable.append(backend)
    return usable


def verify(
    model: nn.Module,
    *,
    pairs: int = 4,
    seed: int = 0,
    backends: Sequence[str] | None = None,
    tolerance: tuple[float, float] | None = None,
    out=None,
) -> bool:
    """Print a table of differences; True if every backend and layout is within tolerance."""
    out = out or sys.stdout
    check_shareable(model)
    model.eval()
    dtype = next(model.parameters()).dtype
    atol, rtol = tolerance or TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    groups = random_groups(int(model.config.vocab_size), pairs, seed)  # type: ignore[union-attr,arg-type]
    original = model.config._attn_implementation  # type: ignore[union-attr]
    expected = naive_logps(model, groups)
    backends = list(backends or available_backends(model))
    device = next(model.parameters()).device
    print(
        f"pairopt verify: {type(model).__name__} (model_type "
        f"'{model.config.model_type}'), {str(dtype).removeprefix('torch.')} on {device}, "  # type: ignore[union-attr]
        f"{pairs} random pairs; reference: plain forwards with attn_implementation "
        f"'{original}'; tolerance |diff| <= {atol:g} + {rtol:g} * |logp|",
        file=out,
    )
    print(f"{'backend':<8} {'layout':<16} {'max |diff|':>11} {'allowed':>9}  result", file=out)
    ok = True
    for backend in backends:
        for name, (share, pack) in LAYOUTS.items():
            with torch.no_grad():
                got = (
                    compute_response_logps(
                        model,
                        groups,
                        share_prefix=share,
                        packing=pack,
                        backend=backend,
                        max_tokens_per_row=256,
                        bucket_size=128 if backend == "flex" else 16,
                    )
                    .logps.double()
                    .cpu()
                )
            diff = (got - expected).abs()
            allowed = atol + rtol * expected.abs()
            good = bool((diff <= allowed).all()) and bool(torch.isfinite(got).all())
            ok &= good
            print(
                f"{backend:<8} {name:<16} {diff.max().item():>11.3e} "
                f"{allowed.min().item():>9.1e}  {'ok' if good else 'MISMATCH'}",
                file=out,
            )
    model.set_attn_implementation(original)  # type: ignore[operator]
    verdict = (
        "every backend matches the classic computation: the shared forward is exact here."
        if ok
        else "MISMATCH: do not use share_prefix/packing with this model; please report it."
    )
    print(verdict, file=out)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pairopt verify", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub id, local directory or builtin:NAME")
    parser.add_argument("--pairs", type=int, default=4, help="random pairs to score (default 4)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the pairs and of a bare config"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64", "bfloat16", "float16"],
        help="weights dtype (default float32: differences then show bugs, not rounding)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all usable)",
    )
    parser.add_argument(
        "--atol", type=float, default=None, help="absolute tolerance (default by dtype)"
    )
    parser.add_argument(
        "--rtol", type=float, default=None, help="relative tolerance (default by dtype)"
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        raise PairoptError(f"--pairs must be >= 1, got {args.pairs}.")
    for name in ("atol", "rtol"):
        value = getattr(args, name)
        if value is not None and not value >= 0:  # NaN fails too
            raise PairoptError(f"--{name} must be >= 0, got {value}.")
    device = resolve_device(args.device)
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    if backends and (bad := sorted(set(backends) - set(BACKENDS))):
        raise PairoptError(f"--backends: unknown {bad}; choose from {', '.join(BACKENDS)}.")
    if backends and "flex" in backends:
        check_flex_device(device, "--backends")
    model = load_causal_lm(
        args.model, dtype=args.dtype, seed=args.seed, trust_remote_code=args.trust_remote_code
    ).to(device)
    default_atol, default_rtol = TOLERANCES[getattr(torch, args.dtype)]
    tolerance = (
        default_atol if args.atol is None else args.atol,
        default_rtol if args.rtol is None else args.rtol,
    )
    return (
        0
        if verify(model, pairs=args.pairs, seed=args.seed, backends=backends, tolerance=tolerance)
        else 1
    )
