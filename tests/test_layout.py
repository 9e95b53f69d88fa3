"""The layering: library modules below, command modules (the `python -m` entry points) on top, imported by none."""

import ast
from pathlib import Path

from tests.helpers import REPO

COMMANDS = {
    "covidct.run",
    "covidct.evaluate",
    "covidct.predict",
    "covidct.explain",
    "covidct.bench",
    "covidct.report.__main__",
    "covidct.data.__main__",
    "covidct.federated.hospitals",
}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def _imported(path: Path) -> set[str]:
    """Every covidct module `path` imports, at the top or inside a function (`from covidct import run` too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("covidct")}


def test_no_module_imports_a_command_module():
    offences = {
        _module(path): sorted(_imported(path) & (COMMANDS - {_module(path)}))
        for path in sorted((REPO / "covidct").rglob("*.py"))
    }
    assert {module: found for module, found in offences.items() if found} == {}


def test_the_command_list_is_the_entry_points_there_are():
    """Every module with a `main` run as `python -m` is in COMMANDS, so a new command cannot slip under it."""
    entry_points = {
        _module(path)
        for path in (REPO / "covidct").rglob("*.py")
        if 'if __name__ == "__main__":' in path.read_text() or path.name == "__main__.py"
    }
    assert entry_points - {"covidct.experiments"} == COMMANDS  # experiments: the registry, with a printing main
