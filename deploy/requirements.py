"""Print the project's requirements (and those of the extras named) from pyproject.toml, one a line.

The Dockerfile installs them before copying the code, so a code change does not reinstall torch:
    python requirements.py [EXTRA,EXTRA...] > requirements.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    return list(project["dependencies"]) + [r for e in extras for r in optional[e]]


def main(argv: list[str]) -> None:
    extras = [e.strip() for e in (argv[0] if argv else "").split(",") if e.strip()]
    here = Path(__file__).resolve().parent
    found = [p for p in (Path("pyproject.toml"), here / "pyproject.toml", here.parent / "pyproject.toml") if p.exists()]
    if not found:
        raise SystemExit("pyproject.toml not found (run from the repository root or beside it)")
    print("\n".join(requirements(found[0], extras)))


if __name__ == "__main__":
    main(sys.argv[1:])
