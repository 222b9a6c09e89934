"""``python -m engine``: the ``lookalike`` command (``engine.cli``) without its console script."""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
