"""`python -m quipc ...` (what torchrun runs: torchrun --nproc-per-node N -m quipc compile ...)."""
import sys

from .cli import main

sys.exit(main())
