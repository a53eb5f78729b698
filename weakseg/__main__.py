"""`python -m weakseg` = the `weakseg` command."""

import sys

from weakseg.cli import main

sys.exit(main())
