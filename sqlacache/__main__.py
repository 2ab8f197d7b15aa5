"""`python -m sqlacache ...`: see `sqlacache.cli`."""

import sys

from .cli import main

sys.exit(main())
