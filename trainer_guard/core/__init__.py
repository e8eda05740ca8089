"""Pure core functions behind the guards: they know nothing of the ``Trainer`` (ties, checksums, manifests,
trainable sets, LR groups, dtypes, tokens, heads, loading, update audits, replica divergence)."""
