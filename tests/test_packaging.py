"""What pyproject.toml declares against what the code imports, and `weakseg --version`."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(req: str) -> str:
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> set[str]:
    reqs = list(PROJECT["dependencies"]) + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    return {_name(r) for r in reqs}


def imported_modules() -> dict[str, Path]:
    """Top-level third-party modules imported anywhere in the package -> one file importing it."""
    out: dict[str, Path] = {}
    for path in (REPO / "weakseg").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top != "weakseg" and top not in sys.stdlib_module_names:
                    out.setdefault(top, path)
    return out


def test_every_imported_third_party_module_is_declared():
    dists = md.packages_distributions()
    have = declared()
    missing = {m: str(p.relative_to(REPO)) for m, p in imported_modules().items()
               if not any(d.lower().replace("_", "-") in have for d in dists.get(m, [m]))}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert {"jsonschema", "pyarrow", "pydensecrf"} <= set(imported_modules())  # the scan sees lazy imports too


def test_extras_and_floors():
    extras = PROJECT["optional-dependencies"]
    assert {_name(r) for r in extras["crf"]} == {"pydensecrf2"}
    assert "pydensecrf2" not in {_name(r) for r in PROJECT["dependencies"]}  # only --crf needs it
    assert {"ray", "boto3", "google-api-python-client", "kubernetes"} <= {_name(r) for r in extras["cluster"]}
    assert any(r.startswith("ray[default]") for r in extras["cluster"])
    # the MLflow floor is the version the suite runs with (major.minor)
    (mlflow,) = [r for r in PROJECT["dependencies"] if _name(r) == "mlflow"]
    floor = re.search(r">=\s*([0-9]+\.[0-9]+)", mlflow).group(1)
    assert floor == ".".join(md.version("mlflow").split(".")[:2])
    # the cluster configs use the cloud SDKs the extra brings
    assert "boto3" in (REPO / "cluster" / "aws.yaml").read_text()
    assert "google-api-python-client" in (REPO / "cluster" / "gcp.yaml").read_text()


def test_version_flag(capsys):
    from weakseg.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"weakseg {PROJECT['version']}"
