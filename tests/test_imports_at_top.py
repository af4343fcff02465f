"""Imports sit at the top of their module (issue 20.4); an import inside a function says why it is there."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from tests.conftest import REPO

# not yet reviewed for 20.4 (another change moves their imports); remove once it has
REASON = re.compile(r"#(?!\s*(noqa|fmt:|type:))")  # a comment, not a tool's marker


def _blocks(tree: ast.AST):
    """Runs of consecutive import statements inside functions: (first, last) nodes."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for body in (
            getattr(n, field)
            for n in ast.walk(node)
            for field in ("body", "orelse", "finalbody")
            if isinstance(getattr(n, field, None), list)
        ):
            run: list[ast.stmt] = []
            for statement in [*body, None]:
                if isinstance(statement, ast.Import | ast.ImportFrom):
                    run.append(statement)
                elif run:
                    yield run[0], run[-1]
                    run = []


def test_every_import_inside_a_function_says_why():
    """Lazy only for a reason (a command's start-up time, ray before ray_env_at_entry, a cycle, an optional
    heavy dependency), written next to it: on the import, the line above, or anywhere in its block."""
    unexplained = []
    for package in ("bfn", "pipeline", "tune_spaces"):
        for path in sorted((REPO / package).rglob("*.py")):
            relative = str(path.relative_to(REPO))
            lines = path.read_text().splitlines()
            seen = set()
            for first, last in _blocks(ast.parse("\n".join(lines))):
                if (first.lineno, last.lineno) in seen:
                    continue
                seen.add((first.lineno, last.lineno))
                text = lines[first.lineno - 2 : last.end_lineno]
                if not any(REASON.search(line) for line in text):
                    unexplained.append(f"{relative}:{first.lineno}: {lines[first.lineno - 1].strip()}")
    assert not unexplained, "imports inside functions without a reason:\n" + "\n".join(unexplained)


def test_the_parser_loads_neither_ray_nor_the_heavy_optional_modules():
    """What every `bfn` command imports before it runs (cli, its parser and the command modules it
    registers) loads no ray (it must come after ray_env_at_entry), no mlflow (~1.2 s) and none of the
    optional heavy modules kept lazy for one function (matplotlib, scipy, boto3, optuna)."""
    code = (
        "import sys\n"
        "import pipeline.cli\n"
        "pipeline.cli.build_parser()\n"
        "heavy = ('ray', 'mlflow', 'matplotlib', 'scipy', 'boto3', 'optuna')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
