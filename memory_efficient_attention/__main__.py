"""``python -m memory_efficient_attention {bench,memory} ...`` (also the console script
``memory-efficient-attention``): see ``memory_efficient_attention.bench.cli``."""

from __future__ import annotations

import sys

from memory_efficient_attention.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
