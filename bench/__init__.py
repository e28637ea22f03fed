"""Benchmark harness: our ``appliance`` CLI against borg and restic on one seeded dataset.

``python -m bench`` (``make bench``) generates or reuses the dataset (``bench.dataset``), runs
each tool's backup/incremental/restore steps as measured child processes (``bench.measure``,
``bench.tools``, ``bench.cli``) and prints a table, ratios and the issue's targets
(``bench.report``).  Nothing in the appliance imports this package; it only calls the CLI.
"""
