"""``python -m spark_ext.demo``: the same as ``spark-ext demo``."""

import sys

from spark_ext.demo.cli import main

sys.exit(main())
