"""``python -m gpu_service``: run the GPU inference daemon (same as ``clipline gpu-daemon``)."""

import os
import sys

# OpenMP threads that busy-wait steal the cores the co-located workers decode on; this
# must be set before torch (and its OpenMP runtime) is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gpu_service.daemon import main

sys.exit(main())
