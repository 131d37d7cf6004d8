"""A run's life on disk and in time.

- ``rundir``: fresh run, resume or refusal; the files written at the start.
- ``checkpoint``: checkpoints that resume exactly, and the final Hugging Face export.
- ``safe_load``: checkpoint loads that cannot run code. ``resume_check``: what makes a resumed run the same run.
- ``stopping``: every reason a run stops early (steps, minutes, SIGUSR1/SIGTERM), its exit status, requeue.
- ``nonfinite``: NaN/inf steps: skip or stop before anything is saved.
- ``hangs``: each rank's Python stack in ``stacks/`` when a step hangs or a peer is lost.
- ``startup``: what a run checks and reports before its first step.
- ``export``: ``sftdist export --merge``: a LoRA adapter merged into its base model.
"""
