"""The import rules of docs/ARCHITECTURE.md, read from the source (every import, also those
inside functions), so that the page and the code cannot drift apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "platform" / "radforge"


def _module_name(path: Path) -> str:
    rel = path.relative_to(LIB.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Every module `path` imports (absolute names), at module level only if asked."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _ours(names: set[str], exclude: str) -> set[str]:
    """radforge modules among `names`, as their top module under radforge (models.x → models)."""
    tops = {n.split(".")[1] for n in names if n.startswith("radforge.")}
    return {t for t in tops if (LIB / f"{t}.py").exists() or (LIB / t).is_dir()} - {exclude}


MODULES = sorted(p for p in LIB.rglob("*.py"))


def test_the_walk_sees_the_library():
    names = {_module_name(p) for p in MODULES}
    assert {"radforge.kinds", "radforge.transforms", "radforge.models", "radforge.loader", "radforge.train"} <= names
    # and the import reader sees imports inside functions (loader-style lazy imports)
    assert "radforge.transforms" in _imports(LIB / "kinds.py")


def test_kinds_and_transforms_import_nothing_of_ours_at_module_level():
    for name in ("kinds.py", "transforms.py"):
        assert _ours(_imports(LIB / name, top_level_only=True), exclude=name[:-3]) == set(), name


def test_models_import_only_config_and_kinds():
    for path in (LIB / "models").rglob("*.py"):
        assert _ours(_imports(path), exclude="models") <= {"config", "kinds", "errors"}, path.name


def test_loader_never_imports_train_and_the_library_never_imports_jobs():
    assert "train" not in _ours(_imports(LIB / "loader.py"), exclude="loader")
    for path in MODULES:
        assert not any(n == "jobs" or n.startswith("jobs.") for n in _imports(path)), path


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_only_ingest_and_the_benchmarks_import_ray_data(path):
    if path.name in ("ingest.py",) or "bench" in path.parts:
        return
    assert not any(n == "ray.data" or n.startswith("ray.data.") for n in _imports(path))


def test_jobs_only_hand_their_arguments_to_the_cli():
    jobs = list((ROOT / "jobs").glob("*.py"))
    assert jobs
    for path in jobs:
        ours = {n for n in _imports(path) if n.startswith("radforge.")}
        assert ours <= {"radforge.cli", "radforge.cli.main"}, f"{path.name} imports {sorted(ours)}"
