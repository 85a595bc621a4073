#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")
    from realtime_project.command_line import execute

    sys.exit(execute(sys.argv))


if __name__ == "__main__":
    main()
