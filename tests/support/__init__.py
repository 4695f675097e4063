"""Helpers shared by the tests (bad input files, workers run in subprocesses)."""
