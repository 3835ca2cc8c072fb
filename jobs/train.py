"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.train --recipe jobs/recipes/NAME.yaml
[--set key=value ...] [--resume auto|never]`.

Same options as `radforge train RECIPE`; this file only hands them to the CLI so both stay one
surface. Inside a Ray job the driver connects to the job's cluster (`ray.init()` finds it), and
the trainer's workers are placed by the recipe's `scale` section. With `--working-dir .` the cluster
may not have radforge installed: the source root is then put on the path from the uploaded
working directory.
"""

import argparse
import sys
from pathlib import Path

try:
    import radforge  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from radforge.cli import main  # noqa: E402


def _argv(args: list[str]) -> list[str]:
    """`--recipe X` (the job convention) → the CLI's positional RECIPE; everything else as is."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--recipe", required=True)
    known, rest = p.parse_known_args(args)
    return ["train", known.recipe, *rest]


if __name__ == "__main__":
    raise SystemExit(main(_argv(sys.argv[1:])))
