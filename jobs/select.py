"""`ray job submit … -- python jobs/select.py …`: the same arguments and options as `raytl select`."""

import sys

from raytl.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
