"""``python -m data_pipelines`` -> :func:`data_pipelines.cli.main`."""

import sys

from data_pipelines.cli import main

sys.exit(main())
