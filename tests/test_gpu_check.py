"""examples/gpu_check.py as the device machine will run it (--smoke on the CPU), its guards, and
the engine details it checks: the varlen plan built on the host, flash-attn used only when it
actually runs."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import make_model, random_groups

from pairopt.engine import attention, varlen
from pairopt.engine.forward import forward_layout
from pairopt.engine.layout import build_layout

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "gpu_check.py"

# What the device machine lacks: pairopt is not installed there, nor pydantic, datasets,
# flash-attn or matplotlib. This sitecustomize takes them away in every process it starts.
BARE_MACHINE = """
import importlib.machinery
import sys

sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in str(f.__module__)]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and p.rstrip("/") != {root!r}]


class Bare(importlib.machinery.PathFinder):
    absent = ("pydantic", "datasets", "flash_attn", "matplotlib", "trl", "peft")

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in cls.absent:
            return None  # not installed: importlib.util.find_spec gives None, import fails
        return super().find_spec(name, path, target)


sys.meta_path[:] = [Bare if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(tmp_path: Path, *args: str, bare: bool = False) -> tuple[int, str, dict]:
    env = dict(os.environ)
    if bare:
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(BARE_MACHINE.format(root=str(ROOT)))
        env["PYTHONPATH"] = str(site)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    return done.returncode, done.stdout, report


@pytest.mark.slow  # the script in subprocesses: ~40 s each
def test_smoke_runs_on_a_bare_machine(tmp_path: Path) -> None:
    """Without pairopt installed (the script puts the repository on sys.path itself) and
    without pydantic, datasets, flash-attn or matplotlib."""
    site = tmp_path / "control"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BARE_MACHINE.format(root=str(ROOT)))
    control = subprocess.run(  # the bare environment really lacks them
        [sys.executable, "-c", "import pairopt"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert control.returncode != 0 and "ModuleNotFoundError" in control.stderr
    code, output, report = run_check(tmp_path, "--sections", "exactness,bench", bare=True)
    assert code == 0, output[-3000:] + json.dumps(report["verdict"])
    assert report["verdict"] == []
    exact = report["sections"]["exactness"]["items"]
    assert {"sdpa unshared-padded", "flex shared-packed (forward)", "varlen shared-packed"} <= set(
        exact
    )
    assert all(row["pass"] for name, row in exact.items() if name != "fp32 reference")
    assert len(report["sections"]["bench"]["items"]) == 6  # every profile
    assert (tmp_path / "out" / "bench.json").is_file()
    lines = output.strip().splitlines()  # stdout: the summary is the last thing printed there
    summary = lines[lines.index("=== pairopt GPU check: summary ===") :]
    assert summary[-1] == "verdict: PASS"
    assert any(line.strip().startswith("flex shared-packed (forward)") for line in summary)


@pytest.mark.slow  # the script in subprocesses: ~40 s each
def test_a_failing_section_keeps_the_others_and_fails_the_run(tmp_path: Path) -> None:
    code, output, report = run_check(
        tmp_path, "--sections", "exactness,backends", "--fail", "exactness"
    )
    assert code == 1
    sections = report["sections"]
    assert sections["exactness"]["status"] == "error"
    assert "fails on purpose" in sections["exactness"]["error"]
    assert sections["backends"]["status"] == "done" and len(sections["backends"]["items"]) == 4
    assert "verdict: FAIL" in output and "exactness: error" in output


@pytest.mark.slow  # the script in subprocesses: ~40 s each
def test_a_hanging_floor_is_stopped_and_no_row_passes_without_it(tmp_path: Path) -> None:
    """The watchdog stops the hanging item and the section goes on; without the unshared sdpa
    floor no backend can pass against itself."""
    code, _, report = run_check(
        tmp_path,
        "--sections",
        "exactness",
        "--item-timeout",
        "4",
        "--fail",
        "exactness:sdpa unshared-padded:hang",
    )
    assert code == 1
    items = report["sections"]["exactness"]["items"]
    assert "timed out" in items["sdpa unshared-padded"]["error"]
    rows = [row for name, row in items.items() if "logp_err_per_token" in row]
    assert len(rows) == 5 and not any(row["pass"] for row in rows)


def test_pass_rule_and_verdict() -> None:
    """Twice the floor plus the tolerance: floor 1e-3 nats/token and 2e-2 gradient error allow
    3e-3 and 5e-2."""
    check = load_script()
    floor = {"logp_err_per_token": 1e-3, "grad_rel_err": 2e-2}
    assert check.passes({"logp_err_per_token": 3e-3, "grad_rel_err": 5e-2}, floor)
    assert not check.passes({"logp_err_per_token": 3.1e-3, "grad_rel_err": 5e-2}, floor)
    assert not check.passes({"logp_err_per_token": 0.0, "grad_rel_err": 5.1e-2}, floor)
    assert check.passes({"logp_err_per_token": 0.0, "grad_rel_err": None}, floor)  # forward only
    assert not check.passes({"logp_err_per_token": 0.0, "grad_rel_err": 0.0}, {})  # no floor
    report = {
        "sections": {
            "exactness": {"status": "done", "items": {"a": {"pass": True}, "b": {"pass": False}}},
            "bench": {
                "status": "killed",
                "error": "past its limit",
                "items": {"x": {"error": "e"}},
            },
        }
    }
    failed = check.verdict(report)
    assert failed == ["exactness b: did not pass", "bench: killed (past its limit)", "bench x: e"]


# ------------------------------------------------------------------------- engine details


def test_varlen_plan_is_built_from_the_host_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Derived from the layout as built on the CPU, not from its device copy (which on a GPU
    would be copied back and synchronise at every step)."""
    seen = []
    real = attention.varlen_plan
    monkeypatch.setattr(
        attention, "varlen_plan", lambda layout: seen.append(layout) or real(layout)
    )
    layout = build_layout(random_groups([(5, 3, 4), (2, 6, 1)], seed=1), bucket_size=8)
    forward_layout(make_model("llama"), layout, backend="varlen")
    assert len(seen) == 1 and seen[0] is layout


def test_a_broken_flash_attn_install_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            raise ImportError("libcudart.so.11: cannot open shared object file")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    varlen.flash_attn_available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pairopt"):
            assert varlen.flash_attn_available() is False
        assert "flash-attn is installed but cannot run here" in caplog.text
        assert "libcudart" in caplog.text
    finally:
        varlen.flash_attn_available.cache_clear()
        sys.modules.pop("flash_attn", None)
