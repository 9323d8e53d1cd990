"""``python -m prefect_gpu_operator``: the command line."""

import sys

from prefect_gpu_operator.cli import main

sys.exit(main())
