"""`python -m retnet_train.preflight ...`: the entry point the launch scripts (launch/torchrun.sh,
launch/deepspeed.sh, launch/slurm/*) and torchrun's `-m` use; it only runs cli.main."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
