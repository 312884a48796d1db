"""`pairopt bench` output: the console table, the PNG chart, the environment record."""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pairopt.bench.groups import GroupProfileResult
from pairopt.bench.run import BASELINES, ProfileResult


def format_table(results: Sequence[ProfileResult]) -> str:
    lines = []
    head = (
        f"{'profile':<15}{'mode':<17}{'step s':>8}{'tok/s':>9}{'pairs/s':>9}{'peak MiB':>10}"
        f"{'pack eff':>9}{'x padded':>9}{'x packed':>9}{'% ideal':>8}"
    )
    for res in results:
        lines.append(
            f"{res.profile}: P~{res.prompt_tokens:.0f} C~{res.completion_tokens:.0f}, "
            f"{res.pairs_per_step} pairs/step, ideal x{res.ideal_speedup:.3f}, "
            f"best unshared = {res.best_baseline}"
        )
        lines.append(head)
        for m in res.modes.values():
            mem = "-" if m.peak_memory_mib is None else f"{m.peak_memory_mib:.0f}"
            sp = [m.speedup.get(b) for b in BASELINES]
            sp_text = "".join("        -" if s is None else f"{s:>9.3f}" for s in sp)
            frac = "-" if m.fraction_of_ideal is None else f"{100 * m.fraction_of_ideal:.0f}%"
            lines.append(
                f"{res.profile:<15}{m.mode:<17}{m.step_s:>8.3f}{m.tokens_per_s:>9.0f}"
                f"{m.pairs_per_s:>9.2f}{mem:>10}{m.packing_efficiency:>9.3f}{sp_text}{frac:>8}"
            )
        lines.append("")
    if any(m.breakdown for r in results for m in r.modes.values()):
        lines.append("where the time goes (seconds, summed over the measured batches):")
        lines.append(
            f"{'profile':<15}{'mode':<17}{'attention':>10}{'matmul':>9}{'other ops':>10}"
            f"{'layout':>8}"
        )
        for res in results:
            for m in res.modes.values():
                if m.breakdown:
                    b = m.breakdown
                    lines.append(
                        f"{res.profile:<15}{m.mode:<17}{b['attention_s']:>10.3f}"
                        f"{b['matmul_s']:>9.3f}{b['other_ops_s']:>10.3f}{b['layout_s']:>8.3f}"
                    )
        lines.append("")
    lines.append(f"{'profile':<15}{'ideal':>7}{'shared-packed vs best unshared':>32}{'% ideal':>9}")
    for res in results:
        sp_mode = res.modes.get("shared-packed")
        if sp_mode is None or not res.best_baseline:
            continue
        lines.append(
            f"{res.profile:<15}{res.ideal_speedup:>7.3f}"
            f"{sp_mode.speedup[res.best_baseline]:>32.3f}"
            f"{100 * (sp_mode.fraction_of_ideal or 0):>8.1f}%"
        )
    return "\n".join(lines)


def format_group_table(results: Sequence[GroupProfileResult]) -> str:
    """Group profiles: each mode's step time, pairs/s, memory and speed-ups, and the ideal."""
    labels = [f"{res.profile} ({res.pairs})" for res in results]
    w = max(len(label) for label in labels) + 2
    head = (
        f"{'profile':<{w}}{'mode':<14}{'step s':>8}{'tok/s':>9}{'pairs/s':>9}{'peak MiB':>10}"
        f"{'x unshared':>11}{'x pair-sh.':>11}"
    )
    lines = []
    for label, res in zip(labels, results, strict=True):
        lines.append(
            f"{label}: P~{res.prompt_tokens:.0f} C~{res.completion_tokens:.0f}, k = "
            f"{res.responses}, {res.groups_per_step} prompts and {res.pairs_per_step:.0f} pairs "
            f"per step; token ideal x{res.ideal_vs_unshared:.3f} over unshared, "
            f"x{res.ideal_vs_pair_shared:.3f} over pair-shared"
        )
        lines.append(head)
        for m in res.modes.values():
            mem = "-" if m.peak_memory_mib is None else f"{m.peak_memory_mib:.0f}"
            lines.append(
                f"{label:<{w}}{m.mode:<14}{m.step_s:>8.3f}{m.tokens_per_s:>9.0f}"
                f"{m.pairs_per_s:>9.2f}{mem:>10}{m.speedup['unshared']:>11.3f}"
                f"{m.speedup['pair-shared']:>11.3f}"
            )
        lines.append("")
    lines.append(f"{'profile':<{w}}{'ideal':>8}{'group-shared vs unshared':>26}{'% ideal':>9}")
    for label, res in zip(labels, results, strict=True):
        group = res.modes["group-shared"]
        lines.append(
            f"{label:<{w}}{res.ideal_vs_unshared:>8.3f}"
            f"{group.speedup['unshared']:>26.3f}{100 * res.fraction_of_ideal:>8.1f}%"
        )
    return "\n".join(lines)


def write_chart(results: Sequence[ProfileResult], path: Path, title: str) -> bool:
    """Speed-up per profile against the ideal bound; False (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipped the chart {path}")
        return False
    names = [r.profile for r in results]
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 2), 4.2))
    width = 0.38
    series = [("shared", "unshared-padded", -width / 2), ("shared-packed", None, width / 2)]
    for mode, base, dx in series:
        vals = []
        for r in results:
            m = r.modes.get(mode)
            b = base or r.best_baseline
            vals.append(m.speedup.get(b, math.nan) if m is not None else math.nan)
        label = f"{mode} vs {base}" if base else f"{mode} vs best unshared"
        ax.bar([i + dx for i in x], vals, width, label=label)
    for i, r in enumerate(results):
        ax.hlines(r.ideal_speedup, i - 0.45, i + 0.45, colors="black", linestyles="dashed")
    ax.plot([], [], "k--", label="ideal (2P+C+R)/(P+C+R)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("speed-up (step time ratio)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _cpu_name() -> str:
    try:  # Linux names the CPU model here; platform.processor() is often empty
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
