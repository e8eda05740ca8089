"""Structural checks over ``trainer_guard/`` (issue 15, "one owner per concept"), read from the source with ``ast``:
no import cycle, no import of another module's private name, checkpoint directories named in one module, safetensors
dtype codes tabled in one module, no re-import inside a function of a module imported at the top."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "trainer_guard"

_DTYPE_TABLE_PENDING: tuple[str, ...] = ()  # every module takes dtype codes from formats/safetensors.py
_DTYPE_CODES = {"BF16", "F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL", "C64",
                "C128", "F8_E4M3", "F8_E5M2", "F8_E8M0"}


def _modules() -> dict[str, tuple[pathlib.Path, ast.Module]]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, top_level_only: bool) -> list[tuple[str, ast.AST, str | None]]:
    """``(imported module, node, imported name)`` for every import of ``module`` (top level only: not inside a
    function or ``if TYPE_CHECKING``)."""
    path, tree = MODULES[module]
    is_pkg = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, node, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, is_pkg)
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if sub in MODULES else target, node, a.name))
    return out


def _cycle() -> list[str] | None:
    graph = {m: {t for t, _, _ in _imports(m, True) if t in MODULES and t != m} for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    """Module-level imports inside the package form no cycle (``ops`` reaching back into ``core`` was one)."""
    assert _cycle() is None


def test_no_private_name_imported_from_another_module():
    """``from .x import _name`` couples a module to another's internals: make the name public in its owner, or move
    it (issue 15: ``_class``, ``_param_matches``, ``_as_saved``, ``_dotted_prefixes``, ``_check_tensor``)."""
    bad = [f"{m}: {name} from {target}" for m in MODULES for target, _, name in _imports(m, False)
           if target.startswith("trainer_guard") and name and name.startswith("_") and not name.startswith("__")
           and target != m]
    assert bad == []


def _formats_checkpoint_name(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            if "checkpoint-" in text and any(isinstance(v, ast.FormattedValue) for v in node.values):
                return True
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant)
                and "checkpoint-%" in str(node.left.value)):
            return True
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
                and isinstance(node.func.value, ast.Constant) and "checkpoint-{" in str(node.func.value.value)):
            return True
    return False


def test_checkpoint_directory_named_in_one_module():
    """``checkpoint-{step}`` is formatted by ``trainer_guard.files`` alone (``checkpoint_dir``/``checkpoint_name``)."""
    assert [m for m, (_, tree) in MODULES.items() if _formats_checkpoint_name(tree)] == ["trainer_guard.files"]


def _tables_dtype_codes(tree: ast.Module) -> bool:
    """A dict literal with safetensors dtype codes as keys or values (a code -> size or dtype table)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            consts = [n.value for n in (*node.keys, *node.values) if isinstance(n, ast.Constant)]
            if len(_DTYPE_CODES.intersection(c for c in consts if isinstance(c, str))) >= 2:
                return True
    return False


def test_safetensors_dtype_codes_tabled_in_one_module():
    """The safetensors dtype codes (``"BF16"`` -> 2 bytes, ``torch.bfloat16``) are tabled by
    ``trainer_guard.formats.safetensors`` alone; every other module asks it."""
    tables = [m for m, (path, tree) in MODULES.items()
              if not any(p in path.relative_to(PKG).as_posix() for p in _DTYPE_TABLE_PENDING)
              and _tables_dtype_codes(tree)]
    assert tables == ["trainer_guard.formats.safetensors"]


@pytest.mark.parametrize("module", ["trainer_guard.formats.safetensors", "trainer_guard.files"])
def test_format_modules_are_leaves(module):
    """The file format and file contract import nothing of the package but the errors and each other."""
    allowed = {"trainer_guard.errors", "trainer_guard.formats", "trainer_guard.formats.safetensors", module}
    reached = {t for t, _, _ in _imports(module, True) if t.startswith("trainer_guard")}
    assert reached <= allowed


def _reimports_inside_functions(module: str) -> list[str]:
    top = {(t, name) for t, _, name in _imports(module, True)}
    top_modules = {t for t, name in top if name is None}  # ``import x`` (``from x import y`` imports y, not x)
    bad = []
    for node in ast.walk(MODULES[module][1]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    bad += [f"{module}:{inner.lineno} import {a.name}" for a in inner.names if a.name in top_modules]
                elif isinstance(inner, ast.ImportFrom):
                    target = _resolve(module, inner, MODULES[module][0].name == "__init__.py")
                    bad += [f"{module}:{inner.lineno} from {target} import {a.name}" for a in inner.names
                            if (target, a.name) in top]
    return bad


def test_no_import_inside_a_function_of_what_the_module_imports_at_the_top():
    """A lazy import is for a heavy or optional library the module does not import at the top, never a second
    import of something it already has."""
    assert [b for m in MODULES for b in _reimports_inside_functions(m)] == []
