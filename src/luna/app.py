"""The skeleton every stage's command-line app shares: ``App(argv).main()``, usable from a shell (console
scripts), a rule script (luna.runner) or a notebook, as the book's apps are.

* ``App(argv)`` builds the argparse parser (``prog``, the class docstring as description, defaults shown) and
  parses ``argv`` (``sys.argv[1:]`` when None); ``--help`` exits there, and so does a bad option value, in one
  line (:class:`OneLineErrorParser`, exit status 2);
* ``main()`` sets up logging once, logs "Starting <App>, <arguments>", calls ``run()`` and turns the app's
  bad-input and bad-output errors (``errors``) into one line on stderr, ``<prog>: error: <message>``, and exit
  status 2; Ctrl-C is one line too (exit status 130), and so is SIGTERM (``kill``, Snakemake stopping its jobs,
  SLURM's time limit: exit status 143), which unwinds the same way, so temp files are removed and no output is
  left half-written; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, ClassVar, Iterator, NoReturn, Sequence

from luna.io import OutputError
from luna.runner import setup_logging

logger = logging.getLogger(__name__)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something: not for required options, not "None" (an unset
    option: its help says what happens), not when the help text states its own default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required or action.default is None or "default:" in text or "%(default)" in text:
            return action.help
        return super()._get_help_string(action)


class RawDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """:class:`DefaultsHelpFormatter` that keeps the description's own line breaks (a docstring with a table)."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, ``<prog>: error: <message> (see <prog> --help)``, exit status
    2: argparse prints the whole usage first (30 lines for luna-train) above the one line that matters."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class StageApp:
    """Base of the stage apps: subclasses set ``prog`` and ``errors``, and define ``add_arguments`` and ``run``."""

    prog: ClassVar[str] = ""
    description: ClassVar[str] = ""
    """--help's description; the class docstring when empty."""
    errors: ClassVar[tuple[type[BaseException], ...]] = (OutputError,)
    """Exceptions whose one-line message is the whole story (bad input, an output that cannot be written)."""

    def __init__(self, argv: Sequence[Any] | None = None) -> None:
        self.parser = OneLineErrorParser(prog=self.prog, description=self.description or self.__doc__,
                                         formatter_class=DefaultsHelpFormatter)
        self.add_arguments(self.parser)
        self.args = self.parser.parse_args(None if argv is None else [str(a) for a in argv])

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def run(self) -> Any:
        """The stage's work; raises one of ``errors`` with a one-line message on bad input."""
        raise NotImplementedError

    def main(self) -> int:
        """Run; on one of ``errors`` print one line to stderr and return 2, else return 0."""
        setup_logging()
        logger.info("Starting %s, %s", type(self).__name__, vars(self.args))
        try:
            with sigterm_unwinds():
                self.run()
        except self.errors as exc:
            print(f"{self.prog}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            return interrupted(self.prog, exc)
        return 0

    @classmethod
    def console(cls, argv: Sequence[Any] | None = None) -> None:
        """Entry point of the console script (``argv``: ``sys.argv[1:]`` when None): exit with ``main()``'s status;
        one of ``errors`` raised while checking the arguments (in the constructor) is one line and status 2 too."""
        try:
            app = cls(argv)
        except cls.errors as exc:
            setup_logging()
            print(f"{cls.prog}: error: {exc}", file=sys.stderr)
            sys.exit(2)
        sys.exit(app.main())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt is (:func:`sigterm_unwinds`), so the same
    ``finally`` and ``except BaseException`` blocks clean up."""


def interrupted(prog: str, exc: BaseException | None = None) -> int:
    """Ctrl-C or SIGTERM: one line, exit status 130 or 143 (the shell's for SIGINT and SIGTERM); outputs are
    written atomically, so nothing half-written is left, and a resumable stage resumes on the next run."""
    if isinstance(exc, Terminated):
        print(f"{prog}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` instead of ending the process on the spot: killed by
    default, a stage left its temp files behind, and luna-evaluate a report of two runs' files. Only in the main
    thread and where SIGTERM has its default action (a caller's own handler is kept)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def deferred_sigint() -> Iterator[Callable[[], int]]:
    """Within the block Ctrl-C sets a flag (yielded: a function that returns the signal that came, 0 if none)
    instead of raising KeyboardInterrupt wherever the main thread happens to be: raised inside a weakref or
    ``__del__`` callback (thread pools run many) it is printed as "Exception ignored" and lost, and the run went on
    to the end. The loop checks the flag at its own safe points and calls :func:`raise_for` there; one that comes
    after the last check (as the outputs are committed) lets the work finish. SIGTERM is deferred the same way
    where :func:`sigterm_unwinds` set it to raise. Outside the main thread nothing changes, nor for a signal whose
    handler is a caller's own (or ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    came: list[int] = []
    # each signal on its own: SIGINT is ignored in a script's background job (``luna-crops ... &``), and SIGTERM
    # must still be deferred there
    deferred = ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler else []) + \
        ([signal.SIGTERM] if signal.getsignal(signal.SIGTERM) is _raise_terminated else [])
    previous = {signum: signal.getsignal(signum) for signum in deferred}
    for signum in deferred:
        signal.signal(signum, lambda signum, frame: came.append(signum))
    try:
        yield lambda: came[0] if came else 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def raise_for(signum: int) -> None:
    """Raise what :func:`deferred_sigint` held back, if anything: :class:`Terminated` for SIGTERM, else
    KeyboardInterrupt."""
    if signum == signal.SIGTERM:
        raise Terminated
    if signum:
        raise KeyboardInterrupt


def thread_limit() -> int:
    """The most torch CPU threads an app accepts: 4 per CPU of the machine (more never helped, and OpenMP crashes
    on some thousands)."""
    return 4 * (os.cpu_count() or 1)


SWITCH_CHOICES = ("auto", "on", "off")


def add_switch(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, help: str,
               default: str = "auto") -> None:
    """One convention for the on/off settings with an automatic choice (memory format, precision): ``--X auto|on|off``,
    a bare ``--X`` meaning on and ``--no-X`` meaning off (what luna.runner.config_argv writes for a YAML boolean,
    and YAML 1.1 reads an unquoted on/off as one)."""
    dest = flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, dest=dest, nargs="?", const="on", choices=SWITCH_CHOICES, default=default, help=help)
    parser.add_argument(f"--no-{flag.lstrip('-')}", dest=dest, action="store_const", const="off",
                        default=argparse.SUPPRESS, help=f"the same as {flag} off")
