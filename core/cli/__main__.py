"""``python -m core.cli``: the ``spectrascope`` command (the dashboard starts its jobs this way)."""
import sys

from . import main

sys.exit(main())
