"""Console entry points (pyproject's ``[project.scripts]``): each imports its stage only when run, inside a
guard, so that Ctrl-C during those imports (pandas, torch: about 2 s) is the stages' one line, ``<prog>:
interrupted`` and exit status 130, not a traceback through the import machinery."""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Callable

_CAN_MASK = hasattr(signal, "pthread_sigmask")  # POSIX

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
            # SIGINT held back while the modules load: raised inside torch's C++ module init, KeyboardInterrupt
            # aborted the process now and then (pybind11::error_already_set, SIGABRT); it is delivered just after
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if _CAN_MASK else None
            try:
                target = getattr(importlib.import_module(module), function)
            finally:
                if blocked is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
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
