"""The ``python -m engine.search`` entry point, and nothing else: the command line that indexes a folder of
images and queries it is ``engine.search_cli``; the class that searches is ``engine.searcher.Searcher``."""

import sys

from engine.search_cli import main

if __name__ == "__main__":
    sys.exit(main())
