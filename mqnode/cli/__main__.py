"""`python -m mqnode.cli ...`: the same as the `mqnode` command."""

import sys

from mqnode.cli import main

if __name__ == "__main__":  # not when a spawned child imports the main module again
    sys.exit(main())
