"""Starting a run on machines: no torch here, so ``sftdist launch`` starts in a moment.

- ``launch``: ``sftdist launch``: the torchrun / deepspeed launcher argv, SLURM submission and ``--wait``,
  and the host facts it needs (a free port, the visible GPUs).
- ``slurm``: the sbatch scripts (pure text), the rank environment of an srun task, a finished job's status.
"""
