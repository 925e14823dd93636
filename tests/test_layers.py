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
