"""The ``luna-synth`` command line: :func:`build_parser` (``--out``, ``--jobs`` and one option per
:class:`SynthConfig` field), :class:`SynthApp` (``SynthApp(argv).main()``, as every luna stage, used by the
workflow's rule script) and :func:`main`, the console-script entry point (``luna.synth:main``). Kept apart so
that the library modules carry no argparse or exit codes.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from luna.app import OneLineErrorParser, StageApp, thread_limit
from luna.io import named_output
from luna.synth.config import SynthConfig, SynthError
from luna.synth.dataset import synthesize

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------

def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """luna-synth's argparse parser (what :class:`SynthApp` parses with)."""
    parser = OneLineErrorParser(prog="luna-synth", description=SynthApp.__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--jobs`` and one option per :class:`SynthConfig` field."""
    parser.add_argument("--out", required=True, metavar="ROOT",
                        help="data folder to write: subset*/<uid>.mhd+.raw and the LUNA16 CSVs")
    parser.add_argument("--jobs", type=int, default=1, help="scans generated in parallel (processes)")
    defaults = SynthConfig()
    for f in fields(SynthConfig):
        default = getattr(defaults, f.name)
        help_text = f.metadata["help"].replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(_option(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(_option(f.name), type=float, nargs="+", default=list(default), help=help_text)
        else:
            parser.add_argument(_option(f.name), type=type(default), default=default, help=help_text)


class SynthApp(StageApp):
    """Write a synthetic LUNA16-format data set (chest-CT-like scans, candidates.csv, annotations.csv,
    annotations_excluded.csv, seriesuids.csv)."""

    prog = "luna-synth"
    errors = (ValueError, OSError)  # SynthError, ScanError, OutputError: one line naming the key or the file

    def __init__(self, argv: list[str] | None = None) -> None:
        super().__init__(argv)
        self.summary: dict[str, Any] | None = None
        # checked now, before anything is logged or written: a bad value is one line (SynthApp.console)
        named_output(self.args.out, "--out", "data folder to write")
        if not 1 <= self.args.jobs <= thread_limit():
            raise SynthError(f"--jobs {self.args.jobs}: must be from 1 to {thread_limit()} (4 per CPU of this "
                             "machine)")
        self.synth_config = self.config()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def config(self) -> SynthConfig:
        """The options as a SynthConfig; its errors name the config keys (synthetic.size_xy_min), said here as
        this app's options (--size-xy-min)."""
        values = {f.name: getattr(self.args, f.name) for f in fields(SynthConfig)}
        try:
            return SynthConfig.from_dict(values)
        except SynthError as exc:
            names = "|".join(sorted((name for name in values if "_" in name), key=len, reverse=True))
            message = re.sub(rf"\bsynthetic\.(\w+)|\b({names})\b",
                             lambda m: f"--{(m.group(1) or m.group(2)).replace('_', '-')}", str(exc))
            raise SynthError(message) from None

    def run(self) -> dict[str, Any]:
        self.summary = synthesize(Path(self.args.out), self.synth_config, jobs=self.args.jobs)
        logger.info("summary: %s", json.dumps(self.summary))
        return self.summary


def main(argv: list[str] | None = None) -> None:
    """Console script ``luna-synth``."""
    SynthApp.console(argv)


if __name__ == "__main__":
    main()
