"""`python -m mqnode.cli ...`: the same as the `mqnode` command."""

import sys

from mqnode.cli import main

sys.exit(main())
