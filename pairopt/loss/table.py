"""`pairopt losses`: list the registered losses, their needs and parameters; render docs/losses.md.

Everything shown is read from the registry (each plugin's `kind`, `summary`,
`requires_reference`, `Config` fields and docstring), so the CLI help and the docs cannot drift
from the code. Pair losses and listwise losses are listed apart. A test
checks that docs/losses.md equals `render_markdown()`; regenerate it with

    python -m pairopt.loss.table --markdown > docs/losses.md
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pairopt.loss.base import Loss
from pairopt.loss.registry import (
    BUILTIN_PACKAGE,
    available_losses,
    get_loss_class,
    load_loss_module,
)


@dataclass(frozen=True)
class Param:
    """One row of a loss's parameter table."""

    name: str
    type: str
    default: str
    allowed: str
    description: str


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    # "list[losses.combined.Term]" -> "list[Term]"; "typing.Any" -> "Any"
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])", "", str(annotation))


def _bounds(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Gt):
            parts.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            parts.append(f">= {item.ge}")
        elif isinstance(item, annotated_types.Lt):
            parts.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.Le):
            parts.append(f"<= {item.le}")
        elif isinstance(item, annotated_types.MinLen):
            parts.append(f"at least {item.min_length} item{'s' if item.min_length != 1 else ''}")
        elif isinstance(item, annotated_types.MaxLen):
            parts.append(f"at most {item.max_length} items")
    return ", ".join(parts) or "any"


def _default(field: FieldInfo) -> str:
    if field.default is not PydanticUndefined:
        return repr(field.default)
    if field.default_factory is not None:
        return repr(field.default_factory())  # type: ignore[call-arg]
    return "required"


def params_of(cls: type[Loss]) -> list[Param]:
    """The parameters of a loss, from its pydantic Config."""
    return [
        Param(
            name,
            _type_name(field.annotation),
            _default(field),
            _bounds(field),
            field.description or "",
        )
        for name, field in cls.Config.ordered_fields().items()
    ]


def _reference(cls: type[Loss]) -> str:
    return "yes" if cls.requires_reference else "no"


KIND_TITLES = {
    "pair": "Pair losses: per-pair log-probs (N,); on data with k responses per prompt they "
    "train on the pairs data.pairs picks",
    "list": "Listwise losses: every response of a prompt with its score, (G, K) with a mask; "
    "they need ranked data (prompt, responses, scores)",
}


def _header(name: str, cls: type[Loss]) -> str:
    kind = "listwise, " if cls.kind == "list" else ""
    return f"{name}  ({kind}reference model: {_reference(cls)})"


def by_kind(names: list[str]) -> list[tuple[str, list[str]]]:
    """(kind, its names) for each kind that has any, pair losses first."""
    kinds = [(kind, [n for n in names if get_loss_class(n).kind == kind]) for kind in KIND_TITLES]
    return [(kind, members) for kind, members in kinds if members]


# ---------------------------------------------------------------------------------------------
# Text (the CLI)
# ---------------------------------------------------------------------------------------------


def render_text(names: list[str], *, detail: bool = False) -> str:
    """One block per loss: name, reference need, summary, and its parameters.

    With `detail`, each block also carries the loss's full docstring (formula, defaults, sources).
    """
    blocks = []
    for name in names:
        cls = get_loss_class(name)
        lines = [_header(name, cls), f"    {cls.summary}"]
        if detail and cls.__doc__:
            lines += ["", textwrap.indent(inspect.cleandoc(cls.__doc__), "    "), ""]
        params = params_of(cls)
        if not params:
            lines.append("    parameters: none")
        for p in params:
            head = f"    {p.name}: {p.type} = {p.default}  ({p.allowed})"
            lines.append(head)
            lines += textwrap.wrap(
                p.description, width=96, initial_indent="        ", subsequent_indent="        "
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------
# Markdown (docs/losses.md)
# ---------------------------------------------------------------------------------------------

_INTRO = """\
# Losses

<!-- Generated from the loss registry by `python -m pairopt.loss.table --markdown > docs/losses.md`.
     Do not edit by hand: tests/test_loss_table.py checks this file against the code. -->

Every loss below is a plugin in `losses/` (one file each), registered under its name and loaded
through the `pairopt.losses` entry-point group exactly like a third-party plugin. Losses come in
two kinds, declared by their base class:

- **pair** (`pairopt.PairLoss`): receives per-pair summed log-probabilities and token counts
  (`pairopt.PairLogps`, tensors of shape (N,)) of the policy and, when it needs one, of the
  reference model; returns per-pair losses (N,) and detached scalar metrics. On data with k
  responses per prompt the pairs (`data.pairs`) index into the prompt's response log-probs, so
  a response in several pairs is computed once.
- **list** (`pairopt.loss.ListLoss`): receives every response of each prompt, padded to (G, K)
  (`pairopt.loss.ListLogps`: log-probs, token counts, scores and a mask for groups smaller than
  K), and returns one loss per group (G,). It needs ranked data (prompt, responses, scores);
  on pairwise data the trainer refuses it before any model loads.

The trainer optimises the mean of the per-pair (per-group) losses.

Build one with `pairopt.build_loss(name, **params)` (parameters are checked against the table
under each loss), list them with `pairopt losses`, and add your own with `@pairopt.register_loss`
(see `examples/custom_loss.py`; `--loss-module` loads a module or `.py` file that registers one).

Metrics every loss reports (TRL's names): `rewards/chosen`, `rewards/rejected`,
`rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected` (mean summed log-probs).
Rewards are β·(S − S^ref) for losses with a reference model, and β times the log-prob the loss
compares for reference-free ones (see each loss). Notation: S summed log-probs of a response,
n its token count, A = S/n, c chosen, r rejected, σ the logistic sigmoid.

## Options of the reference-based pair losses

Three options, as in TRL's DPOConfig, are parameters of the losses that list them (defined once
in `pairopt/loss/base.py`, applied before and after the loss's own formula):

- **`f_divergence`, `f_alpha`** (f-DPO, Wang et al. 2023, https://arxiv.org/abs/2309.16240;
  TRL's `f_divergence_type`, `f_alpha_divergence_coef`): the margin compares f'(π/π_ref) of
  chosen and rejected instead of the log-ratios s: `reverse_kl` f(s) = s (the formulas as
  written), `forward_kl` 1 − e^(−s), `js_divergence` log 2 + logσ(s), `alpha_divergence`
  (e^((α−1)s) − 1)/(α−1) (TRL 1.16's form; the paper's α is 1 − this; α = 1 is reverse_kl).
  Per-token losses (ipo, sigmoid_norm) divide each score by its count. The exponent is capped at
  80. Rewards in the metrics stay β·s.
- **`ld_alpha`** (LD-DPO, Liu et al. 2024, https://arxiv.org/abs/2409.06411; TRL's `ld_alpha`):
  with l_p = min(n_c, n_r), a response's summed log-prob becomes
  S_{≤l_p} + α·S_{>l_p} (only the longer response has tokens past l_p), for the policy and the
  reference alike, before anything else; the metrics see the weighted sums too. The engine gives
  the per-token log-probs this needs on the shared forward (they are cached with a precomputed
  reference).
- **`use_weighting`** (WPO, Zhou et al. 2024, https://arxiv.org/abs/2406.11827; TRL's
  `use_weighting`): each pair's loss is multiplied by w_c·w_r with
  w = exp(mean over the response's tokens of log p(y_t) − log Σ_v p_v²), detached, from the
  policy's raw per-token values (as TRL 1.16: no clamp; WPO's own code clamps w_c·w_r at 1). The
  engine computes log Σ_v p_v² in the LM head's chunks; the metric `wpo_weight` is its batch mean.
  Refused by aot and aot_unpaired (their sort would misalign the weights), as in TRL.
"""


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(names: list[str] | None = None) -> str:
    """docs/losses.md: a summary table, then each loss's docstring and parameter table.

    By default only the built-in losses (those defined in the `losses` package), so that the docs
    do not depend on which third-party plugins happen to be installed.
    """
    if names is None:
        names = [
            n
            for n in available_losses()
            if get_loss_class(n).__module__.partition(".")[0] == BUILTIN_PACKAGE
        ]
    out = [_INTRO, "| loss | kind | reference model | summary |", "|---|---|---|---|"]
    out += [
        f"| [`{n}`](#{n}) | {get_loss_class(n).kind} | {_reference(get_loss_class(n))} "
        f"| {_md_cell(get_loss_class(n).summary)} |"
        for n in names
    ]
    for name in names:
        cls = get_loss_class(name)
        source = cls.__module__.replace(".", "/") + ".py"
        out += [
            "",
            f"## {name}",
            "",
            f"Kind: **{cls.kind}**. Reference model: **{_reference(cls)}**. Source: `{source}`.",
            "",
            inspect.cleandoc(cls.__doc__ or cls.summary),
            "",
        ]
        params = params_of(cls)
        if params:
            out += [
                "| parameter | type | default | allowed | description |",
                "|---|---|---|---|---|",
            ]
            out += [
                f"| `{p.name}` | `{_md_cell(p.type)}` | `{_md_cell(p.default)}` | {_md_cell(p.allowed)} "
                f"| {_md_cell(p.description)} |"
                for p in params
            ]
        else:
            out.append("No parameters.")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pairopt losses",
        description="List the registered losses: summary, whether a reference model is needed, "
        "and parameters with defaults and allowed values. Name losses to see their full documentation.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="show these losses in full (default: all, briefly)"
    )
    parser.add_argument(
        "--loss-module",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import a module (dotted name or path to a .py file) that registers losses; repeatable",
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the markdown of docs/losses.md (built-in losses) instead",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    for module in args.loss_module:
        load_loss_module(module)
    if args.markdown:
        print(render_markdown(args.names or None), end="")
        return 0
    if args.names:
        for name in args.names:
            get_loss_class(name)  # unknown names fail here, listing the valid ones
        print(render_text(args.names, detail=True))
        return 0
    names = available_losses()
    print(
        f"{len(names)} registered losses. `pairopt losses NAME` shows a loss's formula, defaults and "
        "their sources.\nSet parameters with `pairopt train --loss NAME --loss.PARAM VALUE` "
        "(or beside loss.name in YAML).\n"
    )
    for kind, members in by_kind(names):
        print(f"{KIND_TITLES[kind]}:\n")
        print(render_text(members) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
