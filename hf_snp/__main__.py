"""``python -m hf_snp ...``: the hf-snp command line."""

import sys

from .cli import main

sys.exit(main())
