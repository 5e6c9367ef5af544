"""The package layout: the library never imports the application, and the 0.1 import paths still work."""

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import hf_less
from hf_less._moved import MOVED

LIBRARY = Path(__file__).resolve().parents[1] / "hf_less"
APPLICATION = "hf_less.cli"


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(LIBRARY.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.update([base] + [f"{base}.{a.name}" for a in node.names])
    return names


def test_the_library_never_imports_the_application():
    offenders = {}
    for path in LIBRARY.rglob("*.py"):
        if path.is_relative_to(LIBRARY / "cli"):
            continue
        bad = sorted(n for n in _imported_modules(path) if n == APPLICATION or n.startswith(APPLICATION + "."))
        if bad:
            offenders[str(path.relative_to(LIBRARY.parent))] = bad
    assert offenders == {}


def test_importing_hf_less_loads_neither_the_application_nor_its_dependencies():
    code = ("import sys, hf_less; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('matplotlib', 'gguf', 'trl') or m.startswith('hf_less.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_an_old_module_path_is_the_new_module_and_warns_once(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(FutureWarning, match=rf"`{old}` moved to `{new}`.*until 0\.3"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert importlib.import_module(old) is module  # the second import is silent


def test_from_hf_less_import_an_old_module_name(monkeypatch):
    monkeypatch.delitem(sys.modules, "hf_less.selectors", raising=False)
    monkeypatch.delattr(hf_less, "selectors", raising=False)
    with pytest.warns(FutureWarning, match="hf_less.selection.strategies"):
        from hf_less import selectors
    from hf_less.selection import strategies

    assert selectors.round_robin is strategies.round_robin


def test_the_renamed_modules_that_became_packages_keep_their_names():
    from hf_less import evaluation, selection
    from hf_less.evaluation import metrics
    from hf_less.selection import record

    assert selection.Selection is record.Selection and selection.load_selection is record.load_selection
    assert evaluation.target_loss is metrics.target_loss and evaluation.spearman is metrics.spearman



# Each stage imports only stages on a lower floor (or its own): a helper lives at the level of its lowest user.
FLOORS = {"utils": 0, "_moved": 0, "data": 1, "gradients": 2, "selection": 2, "scoring": 3, "evaluation": 4,
          "training": 4, "cli": 5}


def test_no_import_runs_up_a_floor():
    offenders = []
    for path in LIBRARY.rglob("*.py"):
        parts = path.relative_to(LIBRARY).with_suffix("").parts
        if parts == ("__init__",):
            continue  # the package root re-exports the public API
        stage = parts[0]
        for name in _imported_modules(path):
            target = name.split(".")
            if target[0] != "hf_less" or len(target) < 2 or target[1] not in FLOORS or target[1] == stage:
                continue
            if FLOORS[target[1]] >= FLOORS[stage]:
                offenders.append(f"{'/'.join(parts)} imports {name}")
    assert offenders == []
