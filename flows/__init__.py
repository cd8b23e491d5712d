"""Prefect flows: they only sequence the tasks in tasks/ (DESIGN.md, STYLE.md rule 4).

Defaults for running on a laptop, set before Prefect reads its settings (importing this package comes
first): no telemetry (no network), and a longer wait for the temporary server, whose first start
creates its database and can outlast Prefect's default 20 s on a busy 2-core machine.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
