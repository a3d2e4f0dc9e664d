"""``python -m neuronscope_tl <command>``: the same as the ``neuronscope-tl`` script."""

import sys

from .cli import main

sys.exit(main())
