"""`python -m sao_core.stages <stage> --round URL --shard N`: one shard of a model stage (stages.command)."""

import sys

from sao_core.stages.command import main

sys.exit(main())
