"""The declared lower bounds are the versions the suite runs on in .ci/run (.ci/lowest.txt)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def test_lowest_versions_tested_are_the_declared_bounds() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement.replace(" ", ""))
        assert match, f"{requirement!r}: every dependency carries a lower bound"
        bounds[match.group(1).lower()] = Version(match.group(2))
    pins = {}
    for line in (ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = Version(version)
    assert "torch" not in pins  # 2.13.0+cpu is the only build there is to test here
    assert {name: bounds[name] for name in pins} == pins
    assert set(bounds) - set(pins) == {"torch"}
    assert project["requires-python"] == ">=3.11"
