import sys

from curvfast.cli import main

sys.exit(main())
