"""`python -m extproc` is the `extproc` command."""

import sys

from extproc.cli.main import main

sys.exit(main())
