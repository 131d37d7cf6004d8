"""What a run tells its user while it trains.

- ``metrics_log``: ``metrics.jsonl`` and Weights & Biases.
- ``progress``: the progress bar (or plain lines) and the run summary.
- ``step_metrics``, ``flops``: throughput, MFU and memory per step.
- ``evaluation``: eval passes, the step-0 baseline, early stopping.
- ``samples``: sample generations at fixed prompts.
- ``advice``: practitioners' advice logged once at the start.
"""
