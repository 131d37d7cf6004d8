"""``torchrun ... -m tests.dist.late_rank OVERRIDES``: ``sftdist.train.main()``, with rank 1 starting
``SFTDIST_TEST_LATE_S`` seconds after rank 0, as ranks on different nodes of one job do."""

import os
import time

if os.environ.get("RANK") == "1":
    time.sleep(float(os.environ["SFTDIST_TEST_LATE_S"]))

from sftdist.train import main  # noqa: E402  (after the delay: the run's clock starts here)

main()
