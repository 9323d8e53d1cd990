"""``python -m prefect_gpu_sandbox``: the sandbox's command line."""

import sys

from prefect_gpu_sandbox.cli import main

sys.exit(main())
