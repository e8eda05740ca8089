"""The ``trainer_guard`` logger, placed under transformers' logging so guard lines follow its verbosity.

``transformers.logging.set_verbosity_info()``, ``TrainingArguments(log_level="info")`` (``--log_level info``),
``TRANSFORMERS_VERBOSITY`` and transformers' ``add_handler``/``enable_propagation``/``enable_explicit_format`` apply
to guard lines as they do to the Trainer's own: the logger keeps its name (``logging.getLogger("trainer_guard")``
still reaches it, e.g. to set its own level) and its parent is transformers' library root logger, so it has no
level or handler of its own. Guards log at INFO what went well and at WARNING only what the user should act on.

Example:
    >>> import transformers
    >>> transformers.logging.set_verbosity_info()  # guard INFO lines are shown from now on  # doctest: +SKIP
"""

from __future__ import annotations

import logging

from transformers.utils import logging as hf_logging

__all__ = ["logger"]

logger: logging.Logger = hf_logging.get_logger("trainer_guard")
logger.parent = hf_logging.get_logger()  # transformers' root logger: its level, handlers and propagation
