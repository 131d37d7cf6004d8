"""``torchrun ... -m tests.dist.stale_view OVERRIDES``: ``sftdist.train.main()`` with rank 1 seeing no
checkpoint in the run directory, as a node with a stale view of a shared filesystem (attribute caching) can."""

import os

import sftdist.lifecycle.rundir as rundir
from sftdist.train import main

if os.environ.get("RANK") == "1":
    rundir.latest_checkpoint = lambda run_dir: None

main()
