"""Old module paths (hf-less 0.1) kept working for one release, with a warning.

The flat modules of 0.1 moved into subpackages by stage. ``import hf_less.selector`` (and every other
old path in :data:`MOVED`) still works: a finder on ``sys.meta_path`` answers the old name with the
new module itself (the same object, so ``monkeypatch`` and ``isinstance`` see one module) and warns
once per process with a ``FutureWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

REMOVED_IN = "0.3"

MOVED = {
    "hf_less.features": "hf_less.gradients.per_example",
    "hf_less.projection": "hf_less.gradients.projection",
    "hf_less.featurizer": "hf_less.gradients.featurizer",
    "hf_less.checkpoints": "hf_less.gradients.state",
    "hf_less.store": "hf_less.gradients.store",
    "hf_less.sharded": "hf_less.gradients.sharded",
    "hf_less.streaming": "hf_less.gradients.streaming",
    "hf_less.selector": "hf_less.scoring.less",
    "hf_less.representations": "hf_less.scoring.representations",
    "hf_less.scores": "hf_less.scoring.similarity",
    "hf_less.quality": "hf_less.evaluation.quality",
    "hf_less.selectors": "hf_less.selection.strategies",
    "hf_less.filters": "hf_less.selection.filters",
    "hf_less.distance": "hf_less.selection.distance",
    "hf_less.callback": "hf_less.training.callback",
    "hf_less.config": "hf_less.training.config",
    "hf_less.trainer": "hf_less.training.trainer",
    "hf_less.distributed": "hf_less.utils.distributed",
    "hf_less.identity": "hf_less.utils.identity",
    # the application (hf-less[cli]): named here as strings, imported only when the old path is
    "hf_less.report": "hf_less.cli.report",
    "hf_less.bigbench": "hf_less.cli.bigbench",
    "hf_less.models": "hf_less.cli.models",
}
# hf_less.selection and hf_less.evaluation are packages now: their __init__ re-exports the names
# the old modules had (hf_less.selection.record, hf_less.evaluation.metrics), so they need no alias.


def _caller_stacklevel() -> int:
    """The stack level of the first frame outside the import machinery and this module."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen importlib")
                                 or frame.f_code.co_filename == __file__):
        frame, level = frame.f_back, level + 1
    return level


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        warnings.warn(
            f"`{spec.name}` moved to `{self.new}` in hf-less 0.2; the old path works until {REMOVED_IN}. "
            f"Import from `{self.new}` (the main classes are also in `hf_less`).",
            FutureWarning, stacklevel=_caller_stacklevel())
        return module

    def exec_module(self, module) -> None:  # the module is already executed under its new name
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers the old module names of :data:`MOVED` with their new modules."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
