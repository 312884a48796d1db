"""What happened to the rows of a load: kept, truncated, dropped, skipped, grouped; per split
and overall."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class GroupStats:
    """What grouping made of a split's kept rows, and the tokens one epoch computes.

    Tokens: `grouped` the group-shared layout (prompt once per group, each response once),
    `pair_shared` one [prompt | chosen | rejected] per pair, `unshared` one [prompt | response]
    per response of every pair (the classic computation).
    """

    rows: int = 0
    groups: int = 0
    responses: int = 0
    pairs: int = 0
    duplicates: int = 0  # responses seen again in the same group, kept once
    unpaired_dropped: int = 0  # responses in no pair, not computed (pair losses)
    no_pair: int = 0  # ranked rows left without a pair (ties, min_score_gap), dropped
    grouped: int = 0
    pair_shared: int = 0
    unshared: int = 0
    pairs_mode: str = ""  # data.pairs for ranked data, "" for pairwise rows

    def add(
        self,
        prompt: Sequence[int],
        responses: Sequence[Sequence[int]],
        pairs: Sequence[tuple[int, int]],
    ) -> None:
        P = len(prompt)
        self.groups += 1
        self.responses += len(responses)
        self.pairs += len(pairs)
        self.grouped += P + sum(len(r) for r in responses)
        for c, r in pairs:
            n = len(responses[c]) + len(responses[r])
            self.pair_shared += P + n
            self.unshared += 2 * P + n

    def __str__(self) -> str:
        how = f"pairs={self.pairs_mode}: " if self.pairs_mode else ""
        parts = [
            f"{self.rows} rows -> {self.groups} prompts, {self.responses} responses, "
            f"{how}{self.pairs} pairs"
        ]
        if self.duplicates:
            parts.append(f"{self.duplicates} repeated responses counted once")
        if self.no_pair:
            parts.append(
                f"{self.no_pair} rows dropped with no pair (tied scores or within min_score_gap)"
            )
        if self.unpaired_dropped:
            parts.append(f"{self.unpaired_dropped} responses in no pair not computed")
        if self.grouped:
            parts.append(
                f"tokens per epoch {self.grouped:,} grouped vs {self.pair_shared:,} with one "
                f"prompt per pair (x{self.pair_shared / self.grouped:.2f}) and "
                f"{self.unshared:,} unshared (x{self.unshared / self.grouped:.2f})"
            )
        return ", ".join(parts)


@dataclass
class SplitReport:
    """What happened to one split's rows. `dropped` and `skipped` map a reason to a count."""

    name: str
    rows_read: int
    rows_kept: int
    prompts_truncated: int  # kept rows whose prompt was cut
    responses_truncated: int  # kept rows with at least one response cut
    truncated: int  # kept rows with anything cut
    resplit: int = 0  # kept rows whose prompt/response boundary moved (rows.RowTokenizer.tokenize)
    dropped: dict[str, int] = field(default_factory=dict)  # DROP_REASONS
    skipped: dict[str, int] = field(default_factory=dict)  # BAD_ROW_REASONS
    groups: GroupStats | None = None  # what pairopt.data.groups made of the kept rows

    def __str__(self) -> str:
        parts = [f"{self.name}: {self.rows_read} rows read, {self.rows_kept} kept"]
        if self.truncated:
            parts.append(
                f"{self.truncated} truncated ({self.prompts_truncated} prompts, "
                f"{self.responses_truncated} with a response cut)"
            )
        if self.resplit:
            parts.append(
                f"{self.resplit} re-split (prompt and response join into other tokens than "
                "apart: the response starts where running text puts it)"
            )
        if self.dropped:
            parts.append(f"{sum(self.dropped.values())} dropped ({_reasons(self.dropped)})")
        if self.skipped:
            parts.append(
                f"{sum(self.skipped.values())} bad rows skipped ({_reasons(self.skipped)})"
            )
        if self.groups is not None:
            parts.append(f"grouped: {self.groups}")
        return ", ".join(parts)


@dataclass
class DataReport:
    """Counts for the whole load; `str(report)` is a one-paragraph summary for the log."""

    source: str
    format: str  # resolved format: standard, conversational, implicit (text) or implicit (messages)
    splits: list[SplitReport]
    eval_source: str  # where the eval pairs came from, or why there are none
    unused_files: list[str] = field(default_factory=list)  # of a data folder, with why

    @property
    def rows_read(self) -> int:
        return sum(s.rows_read for s in self.splits)

    @property
    def rows_kept(self) -> int:
        return sum(s.rows_kept for s in self.splits)

    @property
    def truncated(self) -> int:
        return sum(s.truncated for s in self.splits)

    @property
    def dropped(self) -> dict[str, int]:
        return dict(sum((Counter(s.dropped) for s in self.splits), Counter()))

    @property
    def skipped(self) -> dict[str, int]:
        return dict(sum((Counter(s.skipped) for s in self.splits), Counter()))

    def __str__(self) -> str:
        splits = "; ".join(str(s) for s in self.splits)
        unused = f" Not used: {', '.join(self.unused_files)}." if self.unused_files else ""
        return (
            f"Data from {self.source} ({self.format} format). {splits}. Eval: {self.eval_source}."
            f"{unused}"
        )


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
