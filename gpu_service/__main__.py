"""``python -m gpu_service``: run the GPU inference daemon (same as ``clipline gpu-daemon``)."""

import sys

from gpu_service.daemon import main

sys.exit(main())
