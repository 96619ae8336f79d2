"""privbench: privacy evaluation harness for split learning and collaborative inference."""

import os

__version__ = "0.1.0"

# OpenMP threads that busy-wait between parallel regions starve every other process on the
# machine (two runs, or executor workers, slow each other several-fold). PASSIVE makes idle
# threads sleep; it must be set before torch loads its OpenMP runtime, so it is set here, unless
# the user chose a policy. The policy in force is recorded in each run's provenance.
WAIT_POLICY_GIVEN = "OMP_WAIT_POLICY" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
