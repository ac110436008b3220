"""`python -m checkpoints_convert {import,export,reshard} ...`"""

import sys

from checkpoints_convert.cli import main

sys.exit(main())
