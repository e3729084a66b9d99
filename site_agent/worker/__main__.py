"""``python -m site_agent.worker TASK_DIR [--progress-fd N] [--parent-pid N]``: run one task."""

import sys

from .task_runner import main

sys.exit(main())
