"""The ``trainer-guard`` command: ``demo``, ``doctor``, ``diff``.

A user error (bad path, foreign file, invalid config) prints one message and exits non-zero, never a traceback.

Example:
    $ trainer-guard demo
    $ trainer-guard doctor out/checkpoint-4 --json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from .errors import TrainerGuardError

__all__ = ["main"]

# Subcommand -> module; each module defines ``configure(parser)`` and ``run(args) -> int``. A fixed table:
# nothing a user types is imported.
COMMANDS = {
    "demo": ("trainer_guard.demo", "fine-tune a tiny tied model on CPU with the default config and report"),
    "doctor": ("trainer_guard.doctor", "check a checkpoint or model directory on CPU"),
    "diff": ("trainer_guard.diff", "compare two checkpoint or model directories tensor by tensor"),
}


def _available() -> dict[str, object]:
    mods = {}
    for name, (modname, _) in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
    return mods


def main(argv: list[str] | None = None) -> int:
    mods = _available()
    parser = argparse.ArgumentParser(prog="trainer-guard", description="Guards for Hugging Face Trainer runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, mod in mods.items():
        p = sub.add_parser(name, help=COMMANDS[name][1], description=COMMANDS[name][1])
        mod.configure(p)
    args = parser.parse_args(argv)
    try:
        return int(mods[args.command].run(args) or 0)
    except (TrainerGuardError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError) as e:
        print(f"trainer-guard {args.command}: error: {e}", file=sys.stderr)
        if getattr(args, "json", False):  # --json callers parse stdout: they get an object there too
            print(json.dumps({"status": "unusable", "exit_code": 2, "error": str(e)}, indent=2))
        return 2
    except BrokenPipeError:  # output piped into `head` and the reader left: not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print(f"trainer-guard {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
