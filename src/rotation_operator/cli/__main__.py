"""``python -m rotation_operator.cli``."""

import sys

from rotation_operator.cli import main

sys.exit(main())
