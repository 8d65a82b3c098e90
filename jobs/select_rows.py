"""`ray job submit … -- python jobs/select_rows.py …`: the same arguments and options as `raytl select`.
(Not jobs/select.py: a script's folder comes first on sys.path, and that name would hide the standard
library's `select`, which asyncio imports.)"""

import sys

from raytl.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
