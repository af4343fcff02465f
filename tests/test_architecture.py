"""Package boundaries: bfn/ is pure torch math; tune_spaces/ imports only ray.tune."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

FORBIDDEN_IN_BFN = ("ray", "mlflow", "hydra", "omegaconf", "pipeline", "tune_spaces", "boto3", "pyarrow")


def imported_modules(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (REPO / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_bfn_source_imports_no_infrastructure():
    for path, names in imported_modules("bfn").items():
        assert not names & set(FORBIDDEN_IN_BFN), f"{path} imports {names & set(FORBIDDEN_IN_BFN)}"


def test_importing_bfn_loads_no_infrastructure():
    """Indirect imports too: a fresh interpreter that imports all of bfn loads none of them."""
    code = (
        "import sys, bfn, bfn.networks, bfn.losses, bfn.nll, bfn.ema\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN_IN_BFN!r}]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tune_spaces_import_neither_bfn_nor_pipeline():
    for path, names in imported_modules("tune_spaces").items():
        assert not names & {"bfn", "pipeline"}, f"{path} imports {names & {'bfn', 'pipeline'}}"


def test_ruff_is_clean():
    ruff = REPO / ".venv" / "bin" / "ruff"
    exe = str(ruff) if ruff.exists() else "ruff"
    result = subprocess.run([exe, "check", "bfn", "pipeline", "tune_spaces", "tests"], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]


def _pipeline_imports() -> dict[str, set[str]]:
    """Dotted pipeline and ray modules each pipeline file imports, at any depth (absolute imports)."""
    found = {}
    for path in (REPO / "pipeline").rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith(("pipeline", "ray")):
                names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
        found[str(path.relative_to(REPO))] = names
    return found


def test_nothing_outside_the_cli_imports_the_cluster_tools():
    """Submission and the dev stack are operations tools: workers never load them."""
    for path, names in _pipeline_imports().items():
        if path.startswith("pipeline/cluster/") or path == "pipeline/cli.py":
            continue
        assert not any(n.startswith("pipeline.cluster") for n in names), f"{path} imports the cluster tools"


def test_ray_private_modules_are_imported_in_one_isolated_place():
    """Ray's private API changes without notice: one small module uses it, with its reason."""
    users = {path for path, names in _pipeline_imports().items() if any(n.startswith("ray._private") for n in names)}
    assert users == {"pipeline/sweeps/placement_groups.py"}, users
