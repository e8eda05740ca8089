"""Tensor and module names: the one place that says how a parameter's dotted name maps to its module and how a
pattern names it. Pure string functions, no torch (``trainer-guard doctor`` and ``diff`` use them).

Example:
    >>> module_of("model.layers.0.mlp.up_proj.weight")
    'model.layers.0.mlp.up_proj'
    >>> param_matches("model.layers.0.self_attn.q_proj.base_layer.weight", ["q_proj.weight"])
    'q_proj.weight'
    >>> dotted_prefixes("a.b.c")
    ['a', 'a.b', 'a.b.c']
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

__all__ = ["PEFT_SEGMENT", "module_of", "param_matches", "dotted_prefixes"]

#: PEFT's wrappers insert these between a module and its parameter (``q.base_layer.weight``).
PEFT_SEGMENT = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")


def module_of(name: str) -> str:
    """The module path of a tensor name: ``"model.layers.0.mlp.up_proj.weight"`` -> ``"model.layers.0.mlp.up_proj"``.

    A top-level tensor (no dot) is its own module.
    """
    return name.rsplit(".", 1)[0] if "." in name else name


def param_matches(param_name: str, patterns: Sequence[str]) -> str | None:
    """The first pattern that names ``param_name`` or a run of its dotted segments (``*`` globs one segment):
    ``"sinks"`` names ``model.layers.0.self_attn.sinks``, ``"gate.weight"`` names ``model.layers.0.mlp.gate.weight``
    (transformers 5 keeps such parameters in float32 when it loads a model in bf16/fp16). Not a substring match:
    T5's ``"wo"`` does not name a new ``word_head.weight``. PEFT's wrapper segments (``base_layer``) are skipped."""
    parts = PEFT_SEGMENT.sub("", param_name).split(".")
    for pat in patterns:
        pp = pat.split(".")
        if any(all(fnmatch.fnmatchcase(parts[i + j], q) for j, q in enumerate(pp))
               for i in range(len(parts) - len(pp) + 1)):
            return pat
    return None


def dotted_prefixes(name: str) -> list[str]:
    """``name`` and every prefix of it that ends before a ``.``: ``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``. Looking
    these up in a set tests ``name == a or name.startswith(a + ".")`` for every ``a`` at once."""
    return [name[:i] for i, c in enumerate(name) if c == "."] + [name]
