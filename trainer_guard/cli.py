"""The ``trainer-guard`` command: ``demo``, ``doctor``, ``diff``.

A user error (bad path, foreign file, invalid config, bad option) prints one message and exits non-zero, never a
traceback; with ``--json`` (doctor, diff) stdout gets one JSON object then too. Ctrl-C exits 130 (also while the
heavy libraries load); a reader that goes away (``| head``) ends the output quietly, the exit code stays the verdict.
Only the chosen subcommand's module is imported, so ``trainer-guard --help`` loads neither torch nor transformers.

Example:
    $ trainer-guard demo
    $ trainer-guard doctor out/checkpoint-4 --json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

from .errors import TrainerGuardError, UsageError

__all__ = ["main", "emit"]

# Subcommand -> module; each module defines ``configure(parser)`` and ``run(args) -> int``. A fixed table:
# nothing a user types is imported.
COMMANDS = {
    "demo": ("trainer_guard.demo", "fine-tune a tiny model on CPU with every default guard, resume it, and report what each guard did"),
    "doctor": ("trainer_guard.doctor", "check a checkpoint or model directory on CPU"),
    "diff": ("trainer_guard.diff", "compare two checkpoint or model directories tensor by tensor"),
}
JSON_COMMANDS = ("doctor", "diff")  # the subcommands with --json
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


class _ArgumentError(Exception):
    """A command line argparse rejected (its usage line is already on stderr)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting on a bad command line, so ``--json`` callers still get JSON."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.print_usage(sys.stderr)
        raise _ArgumentError(f"{self.prog}: error: {message}")


def _available() -> dict[str, str]:
    """The subcommands whose module is installed, name -> module name; none of them is imported (they load torch)."""
    return {name: modname for name, (modname, _) in COMMANDS.items() if importlib.util.find_spec(modname) is not None}


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line: its first argument that is not an option (the top level has none
    but ``--help``)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _drop_stdout() -> None:
    """Send whatever is still to be written to stdout (now or at exit) to /dev/null: its reader is gone."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (AttributeError, OSError, ValueError):  # not a real file (captured, replaced): swap the object
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass


def emit(text: str) -> None:
    """Print ``text`` and a newline to stdout, flushed.

    A reader that went away (``trainer-guard doctor X | head -1``) is not an error: the rest of the output is
    dropped and the caller's exit code stands. Any other failure to write (a full disk) raises
    :class:`~trainer_guard.errors.UsageError` naming it.
    """
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _drop_stdout()
    except OSError as e:
        _drop_stdout()
        raise UsageError(f"cannot write the report to standard output: {e.strerror or e}") from None


def _tolerant_output() -> None:
    """Paths with characters the terminal's encoding lacks (non-UTF-8 file names, ``PYTHONIOENCODING=ascii``)
    print escaped instead of raising ``UnicodeEncodeError`` halfway through a report."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # pragma: no cover - a stream that cannot be reconfigured
                pass


def _wants_json(argv: list[str]) -> bool:
    wants = any(a == "--json" or (len(a) > 3 and "--json".startswith(a)) for a in argv)
    return wants and _command(argv) in JSON_COMMANDS


def _error_json(message: str) -> None:
    try:
        emit(json.dumps({"status": "unusable", "exit_code": 2, "error": message}, indent=2))
    except UsageError:  # stdout itself is what failed: the message is on stderr
        pass


def _os_message(e: OSError) -> str:
    """``PATH: Permission denied`` for an ``OSError`` no check expected, not ``[Errno 13] ...: 'PATH'``."""
    if e.filename is None or not e.strerror:
        return str(e)
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    return f"{where}: {e.strerror}"


def main(argv: list[str] | None = None) -> int:
    """Run ``trainer-guard`` with ``argv`` (default: ``sys.argv[1:]``) and return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _tolerant_output()
    command, args = "trainer-guard", None
    try:
        available, chosen, mod = _available(), _command(argv), None
        parser = _Parser(prog="trainer-guard", description="Guards for Hugging Face Trainer runs.")
        sub = parser.add_subparsers(dest="command", required=True)
        for name, modname in available.items():
            p = sub.add_parser(name, help=COMMANDS[name][1], description=COMMANDS[name][1])
            if name == chosen:  # only the command that runs (or shows its --help) is imported and configured
                mod = importlib.import_module(modname)
                mod.configure(p)
        try:
            args = parser.parse_args(argv)
        except _ArgumentError as e:
            print(e, file=sys.stderr)
            if _wants_json(argv):
                _error_json(str(e))
            return 2
        command = f"trainer-guard {args.command}"
        return int(mod.run(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the reader left before the command could say more
        _drop_stdout()
        return SIGPIPE_EXIT
    except (TrainerGuardError, OSError) as e:
        message = _os_message(e) if isinstance(e, OSError) else str(e)
        print(f"{command}: error: {message}", file=sys.stderr)
        if getattr(args, "json", False):  # --json callers parse stdout: they get an object there too
            _error_json(message)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
