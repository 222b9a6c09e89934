"""``python -m engine``: the ``lookalike`` command (``engine.cli``) without its console script."""

import sys

from engine.cli import main

sys.exit(main())
