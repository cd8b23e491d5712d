"""One shard of the responses stage: `python -m sao_core.stages.responses --round URL --shard N [--config URL]`.

See sao_core.stages.cli for the arguments; the vllm engine runs this as its child process.
"""

from __future__ import annotations

import sys

from sao_core.stages.cli import main

if __name__ == "__main__":  # vLLM starts its engine processes with spawn, which re-imports __main__
    sys.exit(main("responses"))
