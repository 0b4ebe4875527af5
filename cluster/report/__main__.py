import sys

from cluster.report.cli import main

sys.exit(main())
