"""`ray job submit … -- python jobs/extract.py SOURCE OUTPUT [options]`: the same options as `raytl extract`."""

import sys

from raytl.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
