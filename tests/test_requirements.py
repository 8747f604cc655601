"""requirements.txt pins exactly pyproject's runtime dependencies (and the launchers' small packages from the
`test` extra, tools/pin_requirements.py's LAUNCHER_DEPS), each at a version pyproject allows and at the
version this environment (built from it by `make`) has installed."""

from importlib.metadata import version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def test_requirements_pin_every_runtime_dependency_at_the_installed_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    launchers = [d for d in project["optional-dependencies"]["test"] if Requirement(d).name == "submitit"]
    assert launchers, "submitit left the test extra"
    declared = {canonicalize_name(Requirement(d).name): Requirement(d) for d in project["dependencies"] + launchers}
    lines = [x.strip() for x in (ROOT / "requirements.txt").read_text().splitlines()]
    pins = {}
    for line in lines:
        if not line or line.startswith("#") or line == "-e .":
            continue
        name, pinned = line.split("==")
        pins[canonicalize_name(name)] = pinned
    assert "-e ." in lines  # the package itself, for the notebooks
    assert set(pins) == set(declared), set(pins) ^ set(declared)
    for name, pinned in pins.items():
        assert declared[name].specifier.contains(pinned, prereleases=True), (name, pinned, str(declared[name]))
        assert version(name).split("+")[0] == pinned, (name, version(name), pinned)
