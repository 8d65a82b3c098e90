"""`ray job submit … -- python jobs/predict.py …`: the same arguments and options as `raytl predict`."""

import sys

from raytl.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
