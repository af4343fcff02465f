"""Every library the code imports is declared in pyproject.toml, not left to arrive transitively.

bfn/ may use only the core dependencies; pipeline/ and tune_spaces/ also the `pipeline` extra. An
import is matched to its installed distribution (importlib.metadata), so `import yaml` needs PyYAML.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from tests.conftest import REPO

FIRST_PARTY = {"bfn", "pipeline", "tune_spaces"}
# the official BFN code's top-level modules: `bfn bench device` puts its checkout on sys.path
OFFICIAL_CODE = {("pipeline/bench/device.py", name) for name in ("model", "networks", "probability")}


def declared(*groups: str) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for group in groups:
        requirements += project["optional-dependencies"][group]
    return {canonical(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports(package: str) -> dict[str, set[str]]:
    """{top-level module: files importing it} for the absolute, non-stdlib imports under ``package``."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        relative = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names} - FIRST_PARTY:
                if top not in sys.stdlib_module_names and (relative, top) not in OFFICIAL_CODE:
                    found.setdefault(top, set()).add(relative)
    return found


def test_every_imported_library_is_declared():
    distributions = importlib.metadata.packages_distributions()
    allowed = {"bfn": declared(), "pipeline": declared("pipeline"), "tune_spaces": declared("pipeline")}
    undeclared = []
    for package, names in allowed.items():
        for module, files in third_party_imports(package).items():
            providers = {canonical(d) for d in distributions.get(module, [])}
            if not providers & names:
                undeclared.append(f"{module} ({', '.join(sorted(providers)) or 'not installed'}) in {sorted(files)}")
    assert not undeclared, "imported but not declared in pyproject.toml: " + "; ".join(undeclared)
