"""`ray job submit … -- python jobs/finetune.py …`: the same arguments and options as `raytl finetune`."""

import sys

from raytl.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
