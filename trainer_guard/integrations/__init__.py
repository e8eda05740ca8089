"""Integrations with training programs that load trainer_guard as a plugin (:mod:`.axolotl`)."""

__all__: list[str] = []
