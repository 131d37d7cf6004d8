"""The commands that do not train (``sftdist data|plan|baseline|plot|sweep-report``).

- ``data_cli``: ``data prepare``, ``data inspect``, ``data quality``; rendered by ``inspect`` and
  ``quality_report``.
- ``plan``: memory, data size and run time of a config before any GPU is used.
- ``baseline``, ``baseline_cli``, ``baseline_report``: prompting alone vs. fine-tuning, on the eval split.
- ``plot``, ``sweep_report``: curves of runs, and a learning-rate sweep compared; both read run directories
  through ``run_files``.
- ``config_reference``: generates docs/config-reference.md from the schema.
"""
