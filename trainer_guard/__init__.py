"""trainer_guard: callbacks that keep Hugging Face ``Trainer`` fine-tuning runs from failing silently.

Example:
    >>> import trainer_guard
    >>> from trainer_guard import TiedWeightsGuard, callbacks_from_yaml, find_tied_groups
"""

from __future__ import annotations

from .callbacks import GUARDS, Guard, TiedWeightsGuard
from .callbacks.divergence import ReplicaDivergenceGuard
from .callbacks.dtype import DtypeGuard
from .callbacks.head import HeadGuard
from .callbacks.untrained_tokens import UntrainedTokensGuard
from .callbacks.embedding_lr import EmbeddingLRGuard
from .callbacks.preflight import AdapterSizeGuard
from .callbacks.integrity import IntegrityGuard
from .callbacks.resume import ResumeGuard
from .callbacks.update_audit import UpdateAuditGuard
from .config import callbacks_from_dict, callbacks_from_yaml, default_config_path
from .core.checksum import checksums, file_checksums
from .core.head import missing_head_problems
from .core.loading import LoadResult, load_weights_inplace
from .core.preflight import adapter_preflight
from .core.ties import find_tied_groups, restore_ties
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .wiring import guard

__version__ = "0.1.0"

__all__ = [
    "GUARDS",
    "Guard",
    "TiedWeightsGuard",
    "ReplicaDivergenceGuard",
    "DtypeGuard",
    "HeadGuard",
    "UntrainedTokensGuard",
    "missing_head_problems",
    "IntegrityGuard",
    "load_weights_inplace",
    "LoadResult",
    "ResumeGuard",
    "UpdateAuditGuard",
    "EmbeddingLRGuard",
    "AdapterSizeGuard",
    "adapter_preflight",
    "guard",
    "callbacks_from_dict",
    "callbacks_from_yaml",
    "default_config_path",
    "find_tied_groups",
    "restore_ties",
    "checksums",
    "file_checksums",
    *_errors_all,
]
