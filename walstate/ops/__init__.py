"""Operator tools: the command line and what it runs (verify, dump, doctor,
repair, backup and restore, metrics, progress)."""
