"""``python -m trainer_guard``: the same as the ``trainer-guard`` command (for environments without its script on
``PATH``)."""

import sys

from .cli import main

sys.exit(main())
