"""Where facts live (issues #11, #18, #20): the trainer never loads the engine, core never imports the trainer or
the adapters, the composition root holds no SQL and no model library, no two modules import each other, and
"which version is active" is asked in one place only.

Every check walks the packages' file trees, so a module added later (or moved into a subpackage) is checked
without editing this file; the import graph is read from the source, imports inside functions included, so a lazy
import cannot hide a layering violation (imports under `if TYPE_CHECKING:` never run and do not count).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("core", "bot", "trainer")
MODEL_AND_SQL_LIBRARIES = ("sqlalchemy", "torch", "transformers")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _paths(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _modules(package: str) -> list[str]:
    return [_module_name(path) for path in _paths(package)]


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: anywhere in the module, functions included, but not under
    `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found.extend(item for child in node.orelse for item in _import_nodes(child))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        found.extend(_import_nodes(node))
    return found


def _imported_modules(path: Path) -> set[str]:
    """The absolute names `path` imports (for `from x import y`: both `x` and `x.y`), relative ones resolved."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    names: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
        module = ".".join(part for part in (base, node.module or "") if part)
        names.add(module)
        names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _import_graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports."""
    paths = {_module_name(path): path for package in LAYERS for path in _paths(package)}
    return {name: (_imported_modules(path) & set(paths)) - {name} for name, path in paths.items()}


def _reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    """Every project module importing `start` can load, directly or through others."""
    seen: set[str] = set()
    frontier = list(graph[start])
    while frontier:
        module = frontier.pop()
        if module not in seen:
            seen.add(module)
            frontier.extend(graph[module])
    return seen


def _loaded_after_importing(package: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules named with one of `prefixes` that importing every module of `package` loads, in a fresh
    interpreter (so transitive imports, third-party ones included, count, and this process's do not)."""
    code = (
        f"import json, sys\nfor name in {_modules(package)!r}: __import__(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def _reaches(package: str, prefixes: tuple[str, ...]) -> dict[str, list[str]]:
    graph = _import_graph()
    found = {module: sorted(m for m in _reachable(module, graph) if m.startswith(prefixes)) for module in graph}
    return {module: reached for module, reached in found.items() if module.startswith(package) and reached}


def test_the_trainer_does_not_import_the_engine() -> None:
    """The serving side of versions (and the engine it swaps) is core's; the trainer reaches it through
    `core.retraining.ServingFollower`, and shares only neutral modules with it (`core.hardware`)."""
    assert _loaded_after_importing("trainer", ("core.serving.engine",)) == []
    assert _reaches("trainer", ("core.serving.engine",)) == {}


def test_core_imports_neither_the_trainer_nor_the_adapters() -> None:
    """core/ defines the seams (`core.retraining`, `core.chat.messages`) that trainer/ and bot/ implement, and the
    composition root injects them."""
    assert _loaded_after_importing("core", ("trainer", "bot")) == []
    assert _reaches("core", ("trainer", "bot")) == {}


def test_the_cli_composes_without_sql_or_model_libraries() -> None:
    """No module of bot/ (the adapters, the conversation loop, the CLI, the web app) imports SQL or model
    libraries itself, not even inside a function."""
    for path in _paths("bot"):
        name = path.relative_to(ROOT).as_posix()
        offending = {m for m in _imported_modules(path) if m.split(".")[0] in MODEL_AND_SQL_LIBRARIES}
        assert not offending, f"{name} imports {sorted(offending)}"
        assert "select(" not in path.read_text(), f"{name} runs SQL"


def test_no_module_of_core_bot_or_trainer_is_part_of_an_import_cycle() -> None:
    """A cycle (even one closed by an import inside a function, as `core.chat.limits` ↔ `core.chat.redis_limits` was)
    means two modules are one: the seam between them is drawn in the wrong place."""
    graph = _import_graph()
    for module in graph:
        assert module not in _reachable(module, graph), f"{module} imports itself through its imports"


def test_the_active_version_is_queried_in_one_place() -> None:
    """`core.storage.versions` owns the query (`get_active_version`); everyone else asks it."""
    writers = {
        path.relative_to(ROOT).as_posix()
        for package in LAYERS
        for path in _paths(package)
        if "== VersionStatus.ACTIVE" in path.read_text()
    }
    assert writers == {"core/storage/versions.py"}


def test_is_a_run_going_is_asked_in_one_place() -> None:
    """`core.storage.versions.runs_in_progress` owns the read of the `running` run rows; everyone else asks it."""
    readers = {
        path.relative_to(ROOT).as_posix()
        for package in LAYERS
        for path in _paths(package)
        if "TrainingRun.status == RunStatus.RUNNING" in path.read_text()
    }
    assert readers == {"core/storage/versions.py"}


def test_tests_share_helpers_instead_of_importing_each_other_or_copying_a_recorder() -> None:
    """A test module imports shared helper modules (`tests/*_support.py`, `tests/recording_handler.py`,
    `tests/run_rows.py`), never another test module; the tests' one `ChatHandler` recorder is
    `tests.recording_handler.RecordingHandler`."""
    tests = ROOT / "tests"
    for path in sorted(tests.glob("*.py")):
        importing_tests = {m for m in _imported_modules(path) if m.startswith("tests.test_")}
        assert not importing_tests, f"{path.name} imports {sorted(importing_tests)}"
    others = (path for path in tests.glob("*.py") if path != Path(__file__))
    recorders = {path.name for path in others if "async def mark_delivered(" in path.read_text()}
    assert recorders == {"recording_handler.py"}
