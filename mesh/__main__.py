"""``python -m mesh``: see ``mesh/cli.py``."""

import logging
import os
import sys

from mesh.cli import main

code = main()
if sys.argv[1:2] == ["node"] and "torch" in sys.modules:
    # A node has closed its links, log and data-dir lock by now; torch's native teardown at
    # interpreter exit (its thread pools) then took another 1.7 s (AMD EPYC, 2026-12-06) and
    # up to 4 s in a user's trial after "stopped" was logged: a supervisor restarting the node
    # for an upgrade waits on it. Leave without it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
