"""Guard callbacks and the registry that YAML configs name them by.

``GUARDS`` maps each YAML key to its class, in the order callbacks are built (which is the order they run).
"""

from __future__ import annotations

from .base import Guard
from .divergence import ReplicaDivergenceGuard
from .embedding_lr import EmbeddingLRGuard
from .integrity import IntegrityGuard
from .preflight import AdapterSizeGuard
from .resume import ResumeGuard
from .tied_weights import TiedWeightsGuard
from .update_audit import UpdateAuditGuard

__all__ = ["GUARDS", "Guard", "TiedWeightsGuard", "ReplicaDivergenceGuard", "IntegrityGuard", "UpdateAuditGuard", "ResumeGuard", "EmbeddingLRGuard", "AdapterSizeGuard"]

GUARDS: dict[str, type[Guard]] = {
    TiedWeightsGuard.name: TiedWeightsGuard,
    ResumeGuard.name: ResumeGuard,
    AdapterSizeGuard.name: AdapterSizeGuard,  # report only: what training embed_tokens/lm_head in an adapter costs
    EmbeddingLRGuard.name: EmbeddingLRGuard,  # after resume: splits the optimizer groups lazily, at the first step
    ReplicaDivergenceGuard.name: ReplicaDivergenceGuard,
    IntegrityGuard.name: IntegrityGuard,  # after tie/dtype/resume fixes: checks the resumed model as it trains
    UpdateAuditGuard.name: UpdateAuditGuard,  # last: its baseline follows every other guard's changes
}
