"""What happened to the rows of a load: kept, truncated, dropped, skipped; per split and overall."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


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
        return ", ".join(parts)


@dataclass
class DataReport:
    """Counts for the whole load; `str(report)` is a one-paragraph summary for the log."""

    source: str
    format: str  # resolved format: standard, conversational, implicit (text) or implicit (messages)
    splits: list[SplitReport]
    eval_source: str  # where the eval pairs came from, or why there are none

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
        return (
            f"Data from {self.source} ({self.format} format). {splits}. Eval: {self.eval_source}."
        )


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
