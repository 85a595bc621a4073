"""Benchmark harness for the push server and its two reference designs (issue 3).

Run it as ``python -m bench``; bench/README.md says what each scenario measures.
"""
