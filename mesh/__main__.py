"""``python -m mesh``: see ``mesh/cli.py``."""

import sys

from mesh.cli import main

sys.exit(main())
