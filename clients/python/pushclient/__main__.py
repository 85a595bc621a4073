"""``python -m pushclient``: see ``pushclient.cli``."""

import sys

from pushclient.cli import main

sys.exit(main())
