"""Development tooling shared by the cluster script, the tests and the benchmark.

Nothing the server runs imports this package: it starts and stops the server's
processes from outside, as an operator would.
"""
