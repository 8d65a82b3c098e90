"""`ray job submit … -- python jobs/curve.py …`: the same arguments and options as `raytl curve`."""

import sys

from raytl.cli import main

if __name__ == "__main__":
    sys.exit(main(["curve", *sys.argv[1:]]))
