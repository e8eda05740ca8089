"""The user-facing docs name what the code has: configs/default.yaml, the README, docs/ and the guards' docstrings.

Mechanical checks only, so that a renamed option, a changed default, a new guard or a new command-line flag cannot
leave the docs behind unnoticed. (tests/test_config.py checks that default.yaml names every guard and builds;
tests/test_packaging.py that the packaged copy is the same file.)
"""

import argparse
import importlib
import inspect
import re
import typing
from pathlib import Path

import pytest
import yaml

from trainer_guard import GUARDS
from trainer_guard.callbacks.base import option_schema

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DEFAULT_YAML = (ROOT / "configs" / "default.yaml").read_text(encoding="utf-8")
DOCS = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
        for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("name", list(GUARDS))
def test_default_yaml_gives_every_option_with_the_code_default(name):
    """Each guard's block in default.yaml lists exactly its ``__init__`` options, each with the signature's default
    (the file documents the defaults: a value that differs would silently change what 'default' means)."""
    block = dict(yaml.safe_load(DEFAULT_YAML)[name] or {})
    block.pop("enabled", None)
    schema = option_schema(GUARDS[name])
    assert sorted(block) == sorted(schema), f"{name}: default.yaml options differ from {GUARDS[name].__name__}.__init__"
    for option, (_, default) in schema.items():
        assert default is not inspect.Parameter.empty, f"{name}.{option} has no default in __init__"
        got, want = _plain(block[option]), _plain(default)
        assert got == want and type(got) is type(want), f"{name}.{option}: default.yaml {got!r}, __init__ {want!r}"


def _yaml_comment(name, option):
    """The comment of ``option`` in ``name``'s block: its inline comment and the comment-only lines under it."""
    lines = DEFAULT_YAML.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}:"))
    i = next(j for j in range(start + 1, len(lines)) if re.match(rf"\s+{option}:", lines[j]))
    text = [lines[i].partition("#")[2]]
    for line in lines[i + 1:]:
        if not re.match(r"\s+#", line):
            break
        text.append(line.strip().lstrip("#"))
    return " ".join(text)


@pytest.mark.parametrize("name", list(GUARDS))
def test_default_yaml_comments_name_every_choice(name):
    """A choice option (``typing.Literal``) is explained in default.yaml with every value it accepts."""
    for option, (hint, _) in option_schema(GUARDS[name]).items():
        if typing.get_origin(hint) is typing.Literal:
            comment = _yaml_comment(name, option)
            missing = [v for v in typing.get_args(hint) if not re.search(rf"\b{re.escape(str(v))}\b", comment)]
            assert not missing, f"{name}.{option}: default.yaml's comment does not mention {missing}: {comment!r}"


def test_readme_table_names_every_guard():
    table = README.split("## What it guards against", 1)[1].split("\n## ", 1)[0]
    for cls in GUARDS.values():
        assert f"`{cls.__name__}`" in table, f"README's 'What it guards against' table lacks {cls.__name__}"


def test_readme_guards_table_matches_the_default_config():
    """One row per guard in README's 'Guards' table; 'on by default' is default.yaml's ``enabled``, and the default
    mode column names the default of each choice option that sets what the guard does on a finding."""
    table = README.split("\n## Guards\n", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): [c.strip() for c in m.group(2).split("|")]
            for m in re.finditer(r"^\| `(\w+)` \|(.*)\|$", table, re.M)}
    assert sorted(rows) == sorted(cls.__name__ for cls in GUARDS.values())
    config = yaml.safe_load(DEFAULT_YAML)
    for name, cls in GUARDS.items():
        on, mode, when, cost = rows[cls.__name__]
        enabled = bool((config.get(name) or {}).get("enabled", True)) if name in config else False
        assert on.startswith("yes" if enabled else "no"), f"{cls.__name__}: README says {on!r}, default.yaml {enabled}"
        for option in ("mode", "action", "verify", "level"):
            hint, default = option_schema(cls).get(option, (None, None))
            if typing.get_origin(hint) is typing.Literal:
                assert re.search(rf"\b{re.escape(str(default))}\b", mode), \
                    f"{cls.__name__}: README's default mode {mode!r} does not name {option}={default!r}"
        assert when and re.search(r"\d", cost), f"{cls.__name__}: when it acts / measured cost missing"


@pytest.mark.parametrize("name", list(GUARDS))
def test_guard_docstring_documents_every_option(name):
    """Each ``__init__`` option is described under ``Args:`` in the guard's class docstring."""
    cls = GUARDS[name]
    doc = inspect.getdoc(cls) or ""
    assert "Args:" in doc and "Example:" in doc, f"{cls.__name__}: docstring needs Args: and Example:"
    args = doc.split("Args:", 1)[1]
    args = re.split(r"\n(?:Attributes|Raises|Returns|Example):", args, maxsplit=1)[0]
    documented = {n.strip() for line in re.findall(r"^    (\w[\w, ]*):", args, re.M) for n in line.split(",")}
    missing = sorted(set(option_schema(cls)) - documented)
    assert not missing, f"{cls.__name__}: Args: does not describe {missing}"


def _cli_options():
    from trainer_guard.cli import COMMANDS

    out = {}
    for command, (_, _, arguments) in COMMANDS.items():
        parser = argparse.ArgumentParser()
        arguments(parser)
        out[command] = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    return out


def test_readme_command_line_section_names_every_subcommand_option():
    section = README.split("## Command line", 1)[1].split("\n## ", 1)[0]
    for command, options in _cli_options().items():
        line = next((item for item in section.split("\n- ") if f"`trainer-guard {command}" in item), None)
        assert line is not None, f"README's 'Command line' section does not describe trainer-guard {command}"
        missing = [o for o in options if o not in line]
        assert not missing, f"README's trainer-guard {command} entry lacks {missing}"


def _resolves(dotted):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", list(DOCS))
def test_dotted_names_and_repository_paths_in_docs_exist(doc):
    """``trainer_guard.x.y`` names resolve and repository paths (``benchmarks/...``, ``tests/...``) exist."""
    text = DOCS[doc]
    names = set(re.findall(r"\btrainer_guard(?:\.[A-Za-z_]\w*)+", text))
    assert [n for n in sorted(names) if not _resolves(n)] == [], f"{doc} names what the package does not have"
    paths = set(re.findall(r"\b(?:benchmarks|docs|configs|tests|notebooks)/[\w./-]*\w", text))
    assert [p for p in sorted(paths) if not (ROOT / p).exists()] == [], f"{doc} names files that do not exist"
