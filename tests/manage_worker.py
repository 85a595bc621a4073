"""Management commands for the end-to-end tests in one process that set Django up
once (``tests.servers.manage``): a ``manage.py`` of its own costs ~2 s of starting
Django, and a session makes some thirty of them.

Reads one JSON list of ``manage.py`` arguments a line from stdin; writes one JSON
object a line to stdout: the command's ``output``, and its ``error`` if it failed.
Ends when stdin does, so it never outlives the test run that started it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")
    import django
    from django.core.management import call_command
    from django.db import connections

    django.setup()
    answers = sys.stdout
    sys.stdout = sys.stderr  # the answers' stream carries answers only
    for line in sys.stdin:
        output = io.StringIO()
        answer: dict[str, str] = {}
        try:
            with contextlib.redirect_stdout(output):
                call_command(*json.loads(line))
        except Exception:
            answer["error"] = traceback.format_exc()
        finally:
            # As a process of its own would leave it: no connection, no transaction. The
            # pool's too: a session has a worker per environment, each idle most of the
            # time, and PostgreSQL allows 100 connections to the suite's two workers.
            connections.close_all()
            for connection in connections.all():
                if hasattr(connection, "close_pool"):
                    connection.close_pool()
        answer["output"] = output.getvalue()
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
