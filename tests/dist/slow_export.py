"""``torchrun ... -m tests.dist.slow_export OVERRIDES``: ``sftdist.train.main()`` with rank 0's writing of
``final/`` taking ``SFTDIST_TEST_EXPORT_SLEEP_S`` seconds longer, as a 70B model's write does."""

import os
import time

import sftdist.lifecycle.checkpoint as checkpoint
from sftdist.train import main

real_write = checkpoint.write_whole_dir


def slow_write(*args, **kwargs):
    time.sleep(float(os.environ["SFTDIST_TEST_EXPORT_SLEEP_S"]))
    return real_write(*args, **kwargs)


checkpoint.write_whole_dir = slow_write
main()
