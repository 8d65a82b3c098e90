"""`ray job submit … -- python jobs/train.py …`: the same arguments and options as `raytl train`."""

import sys

from raytl.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
