"""Guard callbacks and the registry that YAML configs name them by.

``GUARDS`` maps each YAML key to its class, in the order callbacks are built (which is the order they run).
"""

from __future__ import annotations

from .base import Guard
from .tied_weights import TiedWeightsGuard
from .update_audit import UpdateAuditGuard

__all__ = ["GUARDS", "Guard", "TiedWeightsGuard", "UpdateAuditGuard"]

GUARDS: dict[str, type[Guard]] = {
    TiedWeightsGuard.name: TiedWeightsGuard,
    UpdateAuditGuard.name: UpdateAuditGuard,  # last: its baseline follows every other guard's changes
}
