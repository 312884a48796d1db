"""Helpers of the data tests (test_data, test_data_faults, test_groups_data); their fixtures
`tok` and `quiet_datasets` are in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
