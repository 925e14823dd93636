"""`python -m bot` is the same as the `magpie` command."""

import sys

from bot.cli import main

sys.exit(main())
