"""cluster/constraints.txt, the one source of the versions the cluster nodes and the image install, agrees
with pyproject.toml's ranges and with the environment these tests run in.

Oracles: pyproject.toml read with tomllib, the specifiers checked with `packaging`, and the installed
versions read from importlib.metadata; nothing of weakseg is used.
"""

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "cluster" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
            assert m, f"constraints.txt: {line!r} is not NAME==VERSION"
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def test_every_dependency_is_pinned_within_pyproject_and_as_installed():
    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    pinned = pins()
    for req in deps:
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} (pyproject.toml) has no pin in cluster/constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"cluster/constraints.txt pins {req.name}=={pinned[name]}, outside pyproject.toml's {req.specifier}"
    drift = {n: (v, md.version(n)) for n, v in pinned.items() if md.version(n) != v}
    assert not drift, f"cluster/constraints.txt differs from the installed test environment (pin, installed): {drift}"


def test_the_build_pins_and_the_pinned_torch_match_the_machine_cap():
    pinned = pins()
    assert Requirement(tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"][0]) \
        .specifier.contains(pinned["setuptools"])
    assert pinned["ray"] == md.version("ray")  # `ray up`/`ray job submit` need the same Ray on both sides
