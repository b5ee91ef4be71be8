"""The pins: constraints.txt names an exact version of everything the project uses.

``make install``, CI and the Dockerfile install with ``-c constraints.txt``. Checked
here: every requirement in pyproject.toml (the base and the extras installed by
``[dev]``) is pinned, each pin satisfies pyproject's range, torch is left to its own
index, and the pins are what ``scripts/update-constraints.py`` would write from the
installed environment (so a new or upgraded dependency comes with a new pin).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
FIX = "run `.venv/bin/python scripts/update-constraints.py` after installing"


def pins() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            out[canonicalize_name(name)] = Version(version)
    return out


def test_every_requirement_is_pinned_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    (dev_self,) = [r for r in map(Requirement, optional["dev"]) if r.name == "clipline"]
    lines = list(project["dependencies"])
    for extra in (*dev_self.extras, "dev"):
        lines += optional[extra]
    pinned = pins()
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in ("clipline", "torch") or (req.marker and not req.marker.evaluate()):
            continue
        assert name in pinned, f"{req.name} is not in constraints.txt: {FIX}"
        assert req.specifier.contains(pinned[name], prereleases=True), (line, pinned[name])
    assert "torch" not in pinned and "clipline" not in pinned


def test_pins_match_the_installed_environment() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "update-constraints.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stderr.strip()} ({FIX})"
