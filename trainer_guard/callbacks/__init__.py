"""Guard callbacks and the registry that YAML configs name them by.

``GUARDS`` maps each YAML key to its class, in the order callbacks are built (which is the order they run) and
the order :mod:`~trainer_guard.callbacks.hooks` fires their hooks in, whatever the callback list's order.
"""

from __future__ import annotations

from . import hooks
from .base import Guard
from .divergence import ReplicaDivergenceGuard
from .dtype import DtypeGuard
from .embedding_lr import EmbeddingLRGuard
from .head import HeadGuard
from .integrity import IntegrityGuard
from .preflight import AdapterSizeGuard
from .resume import ResumeGuard
from .tied_weights import TiedWeightsGuard
from .untrained_tokens import UntrainedTokensGuard
from .update_audit import UpdateAuditGuard

__all__ = ["GUARDS", "Guard", "TiedWeightsGuard", "ReplicaDivergenceGuard", "DtypeGuard", "ResumeGuard", "IntegrityGuard", "UpdateAuditGuard", "EmbeddingLRGuard", "AdapterSizeGuard", "HeadGuard", "UntrainedTokensGuard"]

GUARDS: dict[str, type[Guard]] = {
    TiedWeightsGuard.name: TiedWeightsGuard,
    DtypeGuard.name: DtypeGuard,
    UntrainedTokensGuard.name: UntrainedTokensGuard,  # after dtype casts: fixes rows of the final tensors
    ResumeGuard.name: ResumeGuard,
    AdapterSizeGuard.name: AdapterSizeGuard,  # report only: what training embed_tokens/lm_head in an adapter costs
    EmbeddingLRGuard.name: EmbeddingLRGuard,  # after resume: splits the optimizer groups lazily, at the first step
    ReplicaDivergenceGuard.name: ReplicaDivergenceGuard,
    IntegrityGuard.name: IntegrityGuard,  # after tie/dtype/resume fixes: checks the resumed model as it trains
    HeadGuard.name: HeadGuard,  # on_save: the checkpoint must reload with its output head
    UpdateAuditGuard.name: UpdateAuditGuard,  # last: its baseline follows every other guard's changes
}
hooks.set_order(GUARDS.values())
