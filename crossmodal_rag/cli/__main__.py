"""``python -m crossmodal_rag.cli``: the same as ``crossmodal-rag``."""

import sys

from . import main

sys.exit(main())
