"""`python -m trustcap.cli` is the `trustcap` command (used where the console script is not on PATH)."""

import sys

from trustcap.cli import main

sys.exit(main())
