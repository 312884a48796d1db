"""`pairopt losses` and docs/losses.md, both rendered from the registry."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import pairopt.loss.registry as loss_registry
from pairopt import cli
from pairopt.errors import PairoptError
from pairopt.loss import available_losses, get_loss_class
from pairopt.loss import table as loss_table

ROOT = Path(__file__).resolve().parents[1]


def test_listing_shows_every_loss_its_reference_need_and_parameters(capsys):
    assert loss_table.main([]) == 0
    out = capsys.readouterr().out
    for name in available_losses():
        cls = get_loss_class(name)
        need = "yes" if cls.requires_reference else "no"
        kind = "listwise, " if cls.kind == "list" else ""
        assert f"{name}  ({kind}reference model: {need})\n    {cls.summary}\n" in out
    # the two kinds are listed apart, pair losses first
    assert out.index("Pair losses:") < out.index("dpo  (") < out.index("Listwise losses:")
    assert out.index("Listwise losses:") < out.index("plackett_luce  (listwise, reference model")
    assert "dpo  (reference model: yes)" in out and "orpo  (reference model: no)" in out
    # parameters with type, default and bounds, then their description
    assert "    beta: float = 0.1  (> 0)\n        β: temperature on the log-ratio margin" in out
    assert "    label_smoothing: float = 0.0  (>= 0, < 0.5)\n" in out
    assert "    gamma: float = 0.5  (>= 0)\n" in out  # simpo
    assert "    terms: list[Term] = required  (at least 1 item)\n" in out  # combined
    sft_block = out.split("sft  (reference model: no)")[1].split("\n\n")[0]
    assert "parameters: none" in sft_block


def test_naming_a_loss_shows_its_documentation(capsys):
    assert loss_table.main(["ipo"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ipo  (reference model: yes)")
    for part in (
        "Paper:",
        "https://arxiv.org/abs/2310.12036",
        "Formula",
        "Defaults:",
        "Deviations:",
    ):
        assert part in out
    with pytest.raises(
        PairoptError, match=r"unknown loss 'nope'\. Registered losses: aot, aot_unpaired, apo_down"
    ):
        loss_table.main(["nope"])


def test_loss_module_flag_adds_the_module_losses(registry, capsys):
    assert loss_table.main(["--loss-module", str(ROOT / "examples" / "custom_loss.py")]) == 0
    out = capsys.readouterr().out
    assert "margin_dpo  (reference model: yes)" in out
    assert "    margin: float = 1.0  (>= 0)" in out
    with pytest.raises(PairoptError, match="cannot import loss module 'no_such_module_xyz'"):
        loss_table.main(["--loss-module", "no_such_module_xyz"])


def test_through_the_cli_dispatcher(capsys):
    assert cli.main(["losses", "dpo"]) == 0
    assert "Direct Preference Optimization" in capsys.readouterr().out
    assert cli.main(["losses", "nope"]) == 2  # bad input: one paragraph on stderr, no traceback
    err = capsys.readouterr().err
    assert err.startswith("pairopt losses: error: unknown loss 'nope'") and "Traceback" not in err


def test_docs_losses_md_is_the_rendered_registry():
    """Regenerate with: python -m pairopt.loss.table --markdown > docs/losses.md"""
    expected = loss_table.render_markdown()
    actual = (ROOT / "docs" / "losses.md").read_text()
    assert actual == expected, (
        "docs/losses.md is stale: python -m pairopt.loss.table --markdown > docs/losses.md"
    )


def test_markdown_lists_only_builtins_with_their_parameter_tables(registry):
    loss_registry.load_loss_module(str(ROOT / "examples" / "custom_loss.py"))
    text = loss_table.render_markdown()
    assert "margin_dpo" not in text  # the docs do not depend on what else is installed
    headings = re.findall(r"^## (\w+)$", text, flags=re.M)
    assert headings == [
        n for n in available_losses() if get_loss_class(n).__module__.startswith("losses.")
    ]
    assert "| `beta` | `float` | `0.1` | > 0 |" in text
    assert "Source: `losses/kto_pair.py`." in text


def test_module_entry_point_writes_markdown(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["loss_table", "--markdown"])
    assert loss_table.main() == 0
    assert capsys.readouterr().out == loss_table.render_markdown()
