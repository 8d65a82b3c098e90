"""`ray job submit … -- python jobs/audit.py …`: the same arguments and options as `raytl audit`."""

import sys

from raytl.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
