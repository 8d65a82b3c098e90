"""`ray job submit … -- python jobs/extract.py …`: the same arguments and options as `raytl extract`."""

import sys

from raytl.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
