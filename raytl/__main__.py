"""`python -m raytl`: the raytl command, for where the console script is not on PATH."""

from raytl.cli import main

raise SystemExit(main())
