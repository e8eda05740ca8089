"""The ``trainer-guard`` command: ``demo``, ``doctor``, ``diff``.

A user error (bad path, foreign file, invalid config, bad option) prints one message and exits non-zero, never a
traceback; with ``--json`` (doctor, diff) stdout gets one JSON object then too. Ctrl-C exits 130 (also while the
heavy libraries load); a reader that goes away (``| head``) ends the output quietly, the exit code stays the verdict.
Only the chosen subcommand's module is imported, and only to run it: ``trainer-guard --help``,
``trainer-guard doctor --help`` and ``trainer-guard diff --help`` load neither torch nor transformers (this module
owns every subcommand's arguments; ``demo --help`` lists the model kinds, which loads torch).

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

__all__ = ["main", "emit", "COMMANDS"]


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .tiny import KINDS  # the model kinds: this one import loads torch

    parser.add_argument("--model", choices=KINDS, default="llama-manual-tie", metavar="KIND",
                        help=f"tiny model of the guarded run: {', '.join(KINDS)} (default: llama-manual-tie, a "
                             "Llama tied by hand)")
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="YAML config of the guarded run (default: the packaged default.yaml)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="where the guarded run's checkpoints go: a new or empty directory (default: a new "
                             "temporary one, kept so that you can run doctor and diff on it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="first remove an earlier demo's checkpoint-N/ and final/ from --output-dir "
                             "(anything else there still refuses the run)")
    parser.add_argument("--steps", type=int, default=6, metavar="N",
                        help="training steps of the guarded run, at least 2 (default 6; a checkpoint every N//2 "
                             "steps, the resume starts from the first)")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the side-by-side runs of each pitfall without and with its guard")


def _doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint or model directory (holding *.safetensors files)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-manifest-ok", action="store_true",
                        help="a directory without trainer_guard_manifest.json (e.g. a downloaded model) is not "
                             "unusable input: exit 0/1 from the other checks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars, even for big files")


def _diff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="checkpoint or model directory (or one .safetensors file)")
    parser.add_argument("b", metavar="B", help="the directory (or .safetensors file) to compare it with")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--source", choices=("auto", "manifest", "files"), default="auto",
                        help="auto: manifests when both sides have one with the same algorithm, else the files; "
                             "manifest: require manifests; files: always read the safetensors files")
    parser.add_argument("--tensors", action="store_true", help="also list every tensor that differs")
    parser.add_argument("--checksums-only", action="store_true",
                        help="say which tensors changed, not by how much (reads no tensor data when both sides "
                             "have a manifest)")


# Subcommand -> (module that runs it with ``run(args) -> int``, one-line help, the function adding its arguments).
# A fixed table: nothing a user types is imported; the module is imported only when its command runs.
COMMANDS = {
    "demo": ("trainer_guard.demo", "show each pitfall on a tiny model without and with its guard, then train, "
             "checkpoint, resume and reload with every default guard (CPU, offline)", _demo_arguments),
    "doctor": ("trainer_guard.doctor", "check a checkpoint or model directory on CPU", _doctor_arguments),
    "diff": ("trainer_guard.diff", "compare two checkpoint or model directories tensor by tensor, and say how much "
             "each module changed", _diff_arguments),
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
    return {name: modname for name, (modname, _, _) in COMMANDS.items()
            if importlib.util.find_spec(modname) is not None}


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
        available, chosen = _available(), _command(argv)
        parser = _Parser(prog="trainer-guard", description="Guards for Hugging Face Trainer runs.")
        sub = parser.add_subparsers(dest="command", required=True)
        for name in available:
            _, text, arguments = COMMANDS[name]
            p = sub.add_parser(name, help=text, description=text)
            if name == chosen:  # only the command that runs (or shows its --help) gets its arguments
                arguments(p)
        try:
            args = parser.parse_args(argv)
        except _ArgumentError as e:
            print(e, file=sys.stderr)
            if _wants_json(argv):
                _error_json(str(e))
            return 2
        command = f"trainer-guard {args.command}"
        mod = importlib.import_module(available[args.command])  # only now: doctor and diff load torch
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
