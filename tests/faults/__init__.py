"""Fault injection and hostile-input helpers shared by the tests and ``run_faults.py``."""
