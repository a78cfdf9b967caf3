"""``python -m spark_ext.demo``: the same as ``spark-ext demo``."""

import sys

from spark_ext.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
