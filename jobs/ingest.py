"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.ingest SOURCE DEST [...]`.

Same arguments as `radforge ingest`; this file only hands them to the CLI so both stay one surface.
With `--working-dir .` the cluster may not have radforge installed: the source root is then put
on the path from the uploaded working directory.
"""

import sys
from pathlib import Path

try:
    import radforge  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from radforge.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["ingest", *sys.argv[1:]]))
