"""requirements.lock pins what pyproject.toml asks for: `make` installs from the lock, so a dependency
added to pyproject.toml without `make lock` would be missing on a fresh machine."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def _pins() -> dict[str, list[Version]]:
    """name -> versions of the ``name==version ; marker`` lines of the lock (one per Python or platform)."""
    pins: dict[str, list[Version]] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins.setdefault(canonicalize_name(m.group(1)), []).append(Version(m.group(2)))
    return pins


def test_the_lock_pins_every_dependency_of_every_extra() -> None:
    """Each requirement of the project and of each extra in "all" is pinned, at a version its specifier allows."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    extras = project["optional-dependencies"]
    # kedro-vineyard is bench/kedro.py's side venv (Kedro 0.18, which the kedro extra excludes): not locked
    requirements += [Requirement(r) for name, extra in extras.items() if name != "kedro-vineyard" for r in extra]
    pins = _pins()
    missing, outside = [], []
    for r in requirements:
        name = canonicalize_name(r.name)
        if name == canonicalize_name(project["name"]):
            continue  # the "all" extra names the others
        if name not in pins:
            missing.append(str(r))
        elif not all(r.specifier.contains(v, prereleases=True) for v in pins[name]):
            outside.append(f"{r} (locked {', '.join(map(str, pins[name]))})")
    assert not missing and not outside, f"run make lock: not pinned {missing}, pinned outside {outside}"
