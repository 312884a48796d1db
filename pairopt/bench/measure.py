"""Measurements beyond step time: peak memory, where a step's time goes, the LM-head sweep.

Peak = what torch allocates during the step above what was allocated before it. On CUDA that is
`torch.cuda.max_memory_allocated`; the CPU allocator keeps no such statistic, so the profiler
records every allocation and free (`profile_memory=True`) and their running sum, in start order,
gives the peak. The breakdown sorts the profiler's self times of one step into attention kernels,
matrix products (the linear layers and the LM head) and the rest, and times the layout building
(Python) on its own. The sweep runs the LM-head log-probs forward + backward at one row count and
growing vocabularies, chunked (`pairopt.engine.logps.token_logps`) against the naive full (T, V)
logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device, step: Callable[[], None]) -> int:
    """Bytes torch allocates during `step()` above what was allocated before it (at peak)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage  # allocations +, frees -, in start order
        peak = max(peak, current)
    return peak


def step_breakdown(step: Callable[[], None], layout_build: Callable[[], None]) -> dict[str, float]:
    """Seconds of one CPU step by kind of work (the profiler's self times of aten ops), plus the
    time `layout_build()` takes (layout, varlen plan, CPU schedule: Python, once per step)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    layout_build()
    layout_s = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    parts = {"attention_s": 0.0, "matmul_s": 0.0, "other_ops_s": 0.0, "layout_s": layout_s}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if not event.key.startswith("aten::"):
            continue  # autograd / Python wrappers: their aten children carry the time
        if "attention" in event.key:
            parts["attention_s"] += seconds  # fused sdpa forward and backward kernels
        elif event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            parts["matmul_s"] += seconds  # linear layers and the LM head
        else:
            parts["other_ops_s"] += seconds
    return parts


def head_peak_memory(
    hidden: int, vocab: int, tokens: int, chunk_rows: int | None, device: str
) -> int:
    """Peak bytes of the LM-head log-prob forward + backward over `tokens` scored positions:
    chunked (`pairopt.engine.logps.token_logps`, `chunk_rows` rows at a time) or, with
    `chunk_rows=None`, naive (full (T, V) logits, log_softmax, gather)."""
    from pairopt.engine.logps import token_logps

    torch.manual_seed(0)
    head = nn.Linear(hidden, vocab, bias=False, device=device)
    hidden_TD = torch.randn(tokens, hidden, device=device, requires_grad=True)
    target_T = torch.randint(0, vocab, (tokens,), device=device)
    head.weight.grad = torch.zeros_like(head.weight)  # (V, D), allocated up front in every variant

    def step() -> None:
        if chunk_rows is not None:
            logps_T = token_logps(head, hidden_TD, target_T, chunk_rows)
        else:
            logits_TV = head(hidden_TD).float()
            logps_T = logits_TV.log_softmax(-1).gather(-1, target_T[:, None]).squeeze(-1)
        logps_T.sum().backward()

    return peak_memory(torch.device(device), step)


def memory_sweep(
    vocabs: Sequence[int],
    hidden: int,
    tokens: int,
    chunk_size: int,
    chunk_elements: int,
    device: str,
) -> list[dict[str, Any]]:
    """Per vocabulary: the naive head's peak, the chunked head's with `chunk_size` rows (peak
    O(chunk_size * V): grows with V, with a far smaller slope than O(T * V)), and with rows =
    `chunk_elements // V` (a fixed logits budget per chunk: flat in V)."""
    rows = []
    for vocab in vocabs:
        budget_rows = max(1, chunk_elements // vocab)
        full = head_peak_memory(hidden, vocab, tokens, None, device)
        fixed = head_peak_memory(hidden, vocab, tokens, chunk_size, device)
        budget = head_peak_memory(hidden, vocab, tokens, budget_rows, device)
        rows.append(
            {
                "vocab": vocab,
                "hidden": hidden,
                "scored_tokens": tokens,
                "logits_tensor_mib": tokens * vocab * 4 / 2**20,  # one fp32 (T, V) tensor
                # one fp32 (V, D) tensor: the weight gradient of each chunk, before it is
                # added into .grad, is a temporary of this size whatever the chunking
                "weight_mib": vocab * hidden * 4 / 2**20,
                "full_logits_mib": full / 2**20,
                "chunk_rows": chunk_size,
                "chunked_mib": fixed / 2**20,
                "budget_chunk_rows": budget_rows,
                "budget_chunked_mib": budget / 2**20,
            }
        )
    return rows
