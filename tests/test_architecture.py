"""Package boundaries: bfn/ is pure torch math; tune_spaces/ imports only ray.tune."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_ruff_is_clean(command):
    """`ruff format` and `ruff check` as `make lint` runs them (the version is pinned in pyproject)."""
    ruff = REPO / ".venv" / "bin" / "ruff"
    exe = str(ruff) if ruff.exists() else "ruff"
    result = subprocess.run(
        [exe, *command, "bfn", "pipeline", "tune_spaces", "tests"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:]


def test_import_contracts_hold():
    """The layers written in pyproject.toml ([tool.importlinter]), checked by import-linter."""
    lint = REPO / ".venv" / "bin" / "lint-imports"
    result = subprocess.run(
        [str(lint) if lint.exists() else "lint-imports", "--no-cache"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout, result.stdout[-2000:]


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


def pipeline_knowledge_in(root) -> list[str]:
    """'file:line: text' for each pipeline config key (a section of pipeline.config.Config, dotted) in a string or
    comment, and each conf/net preset name anywhere, in the Python files under ``root``."""
    import dataclasses
    import io
    import re
    import tokenize
    import typing

    from pipeline.config import Config

    hints = typing.get_type_hints(Config)
    sections = {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}
    # "net." and "model." also prefix the official checkpoints' state-dict keys and attribute paths in
    # prose: only those sections' own fields count there
    net_keys = [
        f"{name}\\.{f.name}(?!\\w)" for name in ("net", "model") for f in dataclasses.fields(sections.pop(name))
    ]
    config_key = re.compile(rf"(?<![\w.])(?:(?:{'|'.join(sections)})\.[A-Za-z_]\w*|{'|'.join(net_keys)})")
    presets = sorted(path.stem for path in (REPO / "pipeline" / "conf" / "net").glob("*.yaml"))
    assert presets, "no conf/net presets found"
    preset = re.compile(rf"\b(?:{'|'.join(presets)})\b")
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        # one token never spans code like flow.sigma_1 (NAME . NAME): only strings and comments can hold a key
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            found += [
                f"{path}:{token.start[0] + token.string.count(chr(10), 0, m.start())}: {m.group(0)}"
                for m in config_key.finditer(token.string)
            ]
        for number, line in enumerate(source.splitlines(), 1):
            found += [f"{path}:{number}: preset {m.group(0)}" for m in preset.finditer(line)]
    return found


def test_the_scan_for_pipeline_knowledge_finds_keys_and_presets_but_not_code(tmp_path):
    (tmp_path / "m.py").write_text(
        'OVERRIDES = {"net.kwargs": {}, "optim.lr": 1e-4}  # the mnist_unet preset\n'
        'def f(flow, net):\n    return flow.sigma_1, net.kwargs, "net.blocks.0.weight", "model.bayesian_flow.x"\n'
    )
    hits = [hit.split(": ", 1)[1] for hit in pipeline_knowledge_in(tmp_path)]
    assert hits == ["net.kwargs", "optim.lr", "preset mnist_unet"], hits


def test_bfn_knows_no_pipeline_config_keys_or_presets():
    """bfn/ is math and networks: the pipeline's config keys (data.*, flow.*, net.kwargs, ...) and its conf/net
    preset names belong in pipeline/ (e.g. the official-config mapping, pipeline/training/official.py)."""
    found = pipeline_knowledge_in(REPO / "bfn")
    assert not found, "pipeline knowledge in bfn/:\n" + "\n".join(found)


def test_long_modules_say_why_at_their_top():
    """No module over 500 lines without a reason in the first lines of its docstring (STYLE)."""
    long = []
    for package in ("bfn", "pipeline", "tune_spaces", "tests"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            if text.count("\n") > 500 and "Longer than 500 lines" not in "\n".join(text.splitlines()[:8]):
                long.append(str(path.relative_to(REPO)))
    assert long == [], f"over 500 lines without a reason at the top: {long}"


def test_training_path_functions_are_at_most_50_lines():
    """The training path (pipeline/training, pipeline/core) reads in named steps (STYLE)."""
    long = []
    for package in ("pipeline/training", "pipeline/core"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert long == [], f"training-path functions over 50 lines: {long}"
