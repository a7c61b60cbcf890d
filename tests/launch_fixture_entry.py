"""A stand-in for the trainer (``GRANULAR_MOE_ENTRY=launch_fixture_entry``): writes what this process was
given, its distributed environment and its flags, to ``$LAUNCH_FIXTURE_OUT/rank<R>.json``."""

import json
import os
import sys
from pathlib import Path

from granular_moe.training.launch import distributed_env


def main(argv):
    where = distributed_env()
    record = {**where.__dict__, "argv": list(argv), "executable": sys.executable}
    Path(os.environ["LAUNCH_FIXTURE_OUT"], f"rank{where.rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
