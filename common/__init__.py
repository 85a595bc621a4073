"""What every app of the project shares and that imports no app: the error codes, the
``PUSH`` settings, database and Redis access, background tasks, metrics and signing
keys. ``accounts`` and ``push`` both build on it; it builds on Django alone."""
