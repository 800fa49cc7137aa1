"""``python -m torch.distributed.run ... tests/nonfinite_train.py STEPS train CONFIG``: ssltrain's CLI with every
method's loss NaN at STEPS (comma-separated optimizer steps), for the guard's multi-process tests."""

import sys

from faults import nonfinite_at

from ssltrain.cli import main

if __name__ == "__main__":
    with nonfinite_at(int(s) for s in sys.argv[1].split(",") if s):
        sys.exit(main(sys.argv[2:]))
