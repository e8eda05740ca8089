"""trainer_guard: callbacks that keep Hugging Face ``Trainer`` fine-tuning runs from failing silently.

The public names load on first use (PEP 562): ``import trainer_guard`` (and ``trainer-guard --help``) does not import
torch or transformers; ``trainer_guard.TiedWeightsGuard`` or ``from trainer_guard import TiedWeightsGuard`` does.
The error classes are light and load eagerly.

Example:
    >>> import trainer_guard
    >>> from trainer_guard import TiedWeightsGuard, callbacks_from_yaml, find_tied_groups
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .lazy import lazy_exports

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these on first use
    from .callbacks import GUARDS, Guard, TiedWeightsGuard
    from .callbacks.divergence import ReplicaDivergenceGuard
    from .callbacks.dtype import DtypeGuard
    from .callbacks.embedding_lr import EmbeddingLRGuard
    from .callbacks.head import HeadGuard
    from .callbacks.integrity import IntegrityGuard
    from .callbacks.preflight import AdapterSizeGuard
    from .callbacks.resume import ResumeGuard
    from .callbacks.untrained_tokens import UntrainedTokensGuard
    from .callbacks.update_audit import UpdateAuditGuard
    from .config import callbacks_from_dict, callbacks_from_yaml, default_config_path
    from .checksum.disk import file_checksums
    from .checksum.tensors import checksums
    from .checkpoint.verify import verify_checkpoint
    from .core.head import missing_head_problems
    from .core.loading import LoadResult, load_weights_inplace
    from .core.preflight import adapter_preflight
    from .core.ties import find_tied_groups, restore_ties
    from .wiring import guard

__version__ = "0.1.0"

# Public name -> the submodule (relative to this package) that defines it.
_LAZY: dict[str, str] = {
    "GUARDS": ".callbacks",
    "Guard": ".callbacks",
    "TiedWeightsGuard": ".callbacks",
    "ReplicaDivergenceGuard": ".callbacks.divergence",
    "DtypeGuard": ".callbacks.dtype",
    "HeadGuard": ".callbacks.head",
    "UntrainedTokensGuard": ".callbacks.untrained_tokens",
    "missing_head_problems": ".core.head",
    "IntegrityGuard": ".callbacks.integrity",
    "load_weights_inplace": ".core.loading",
    "LoadResult": ".core.loading",
    "ResumeGuard": ".callbacks.resume",
    "UpdateAuditGuard": ".callbacks.update_audit",
    "EmbeddingLRGuard": ".callbacks.embedding_lr",
    "AdapterSizeGuard": ".callbacks.preflight",
    "adapter_preflight": ".core.preflight",
    "guard": ".wiring",
    "callbacks_from_dict": ".config",
    "callbacks_from_yaml": ".config",
    "default_config_path": ".config",
    "find_tied_groups": ".core.ties",
    "restore_ties": ".core.ties",
    "checksums": ".checksum.tensors",
    "file_checksums": ".checksum.disk",
    "verify_checkpoint": ".checkpoint.verify",
}

__all__ = [*_LAZY, *_errors_all]


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
