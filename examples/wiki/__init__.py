"""The Wikipedia demo (``make demo``): prepare.py, run.py, hot_swap.py, report.py."""
