"""Console entry points (pyproject's ``[project.scripts]``): each imports its stage only when run, inside a
guard, so that Ctrl-C during those imports (pandas, torch: about 2 s) is the stages' one line, ``<prog>:
interrupted`` and exit status 130, not a traceback through the import machinery."""

from __future__ import annotations

import importlib
import sys
from typing import Callable

# console script -> (module, function) of the stage it runs
ENTRIES: dict[str, tuple[str, str]] = {
    "luna-synth": ("luna.synth", "main"),
    "luna-candidates": ("luna.candidates", "main_candidates"),
    "luna-split": ("luna.splits", "main"),
    "luna-crops": ("luna.crops", "main"),
    "luna-train": ("luna.training", "main"),
    "luna-predict": ("luna.validation", "main_predict"),
    "luna-evaluate": ("luna.evaluation", "main"),
    "luna-validate": ("luna.validation", "main"),
}


def _entry(prog: str) -> Callable[[], object]:
    module, function = ENTRIES[prog]

    def run() -> object:
        try:
            target = getattr(importlib.import_module(module), function)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            sys.exit(130)
        return target()

    run.__name__ = run.__qualname__ = prog.replace("-", "_")
    run.__doc__ = f"``{prog}``: {module}.{function}()"
    return run


luna_synth = _entry("luna-synth")
luna_candidates = _entry("luna-candidates")
luna_split = _entry("luna-split")
luna_crops = _entry("luna-crops")
luna_train = _entry("luna-train")
luna_predict = _entry("luna-predict")
luna_evaluate = _entry("luna-evaluate")
luna_validate = _entry("luna-validate")
