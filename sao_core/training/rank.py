"""One training rank: what `accelerate launch` / `torchrun` start, and what runs by hand on a GPU box.

    python -m sao_core.training.rank --config CFG --pairs URL --output URL [--set training.max_steps=10]
    torchrun --nproc_per_node 2 -m sao_core.training.rank --config CFG --pairs URL --output URL

It trains whatever the launcher set up (WORLD_SIZE, RANK); `training.launcher` is not read here.
Exit code 0 when the model is written, 1 with the error on stderr otherwise.
"""

from __future__ import annotations

import argparse
import sys

from sao_core.errors import SAOError
from sao_core.store.layout import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sao_core.training.rank", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", required=True, help="round config YAML (path or URL)")
    parser.add_argument("--pairs", required=True, help="pairs folder or file, by URL")
    parser.add_argument("--output", required=True, help="model folder, by URL")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from sao_core.training import run_training

    try:
        cfg = load_config(args.config, args.overrides)
        run_training(cfg, args.pairs, args.output)
    except SAOError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
