"""Where facts live on the learning side (issue #11): the trainer never loads the engine, the composition root
holds no SQL and no model library, and "which version is active" is asked in one place only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_AND_SQL_LIBRARIES = ("sqlalchemy", "torch", "transformers")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
    return names


def test_the_trainer_does_not_import_the_engine() -> None:
    """The serving side of versions (and the engine it swaps) is core's; the trainer reaches it through
    `core.retraining.ServingFollower`. Checked in a fresh interpreter, so transitive imports count."""
    modules = ["trainer.orchestrator", "trainer.retrain", "trainer.runs", "trainer.process", "trainer.schedule"]
    code = f"import sys\nfor name in {modules!r}: __import__(name)\nprint('core.engine' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_cli_composes_without_sql_or_model_libraries() -> None:
    """No module of bot/ (the adapters, the conversation loop, the CLI) imports SQL or model libraries."""
    for path in sorted((ROOT / "bot").glob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        imported = _imported_modules(path)
        offending = {m for m in imported if m.split(".")[0] in MODEL_AND_SQL_LIBRARIES}
        assert not offending, f"{name} imports {sorted(offending)}"
        assert "select(" not in path.read_text(), f"{name} runs SQL"


def test_the_active_version_is_queried_in_one_place() -> None:
    """`core.versions` owns the query (`get_active_version`); everyone else asks it."""
    writers = {
        path.relative_to(ROOT).as_posix()
        for package in ("core", "bot", "trainer")
        for path in (ROOT / package).rglob("*.py")
        if "== VersionStatus.ACTIVE" in path.read_text()
    }
    assert writers == {"core/versions.py"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (in functions too), resolving relative imports
    and `from package import module`."""
    name, tree = _module_name(path), ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {module for module in found if module in known and module != name}


def test_no_module_of_core_bot_or_trainer_is_part_of_an_import_cycle() -> None:
    """A cycle (even one closed by an import inside a function, as `core.limits` ↔ `core.redis_limits` was) means
    two modules are one: the seam between them is drawn in the wrong place."""
    paths = {
        _module_name(path): path for package in ("core", "bot", "trainer") for path in (ROOT / package).rglob("*.py")
    }
    graph = {name: _project_imports(path, set(paths)) for name, path in paths.items()}
    for start, imported in graph.items():
        seen, frontier = set(), list(imported)
        while frontier:
            module = frontier.pop()
            assert module != start, f"{start} imports itself through {sorted(seen)}"
            if module not in seen:
                seen.add(module)
                frontier.extend(graph[module])
