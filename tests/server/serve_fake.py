"""Run the server over a slow fake engine, as ``embedpool serve`` would (for the SIGTERM test).

    python tests/server/serve_fake.py PORT DELAY_PER_BATCH_S
"""

from __future__ import annotations

import sys

from server_support import DIM

from embedpool.executor import InProcessExecutor
from embedpool.server import ServerSettings, run_server
from embedpool.testing import FakeEngineSpec


def main() -> None:
    port, delay = int(sys.argv[1]), float(sys.argv[2])
    spec = FakeEngineSpec(dim=DIM, delay_per_batch_s=delay)
    settings = ServerSettings(port=port, api_key="", graceful_timeout_s=30, log_level="warning")
    run_server(settings, lambda: InProcessExecutor(spec.build))


if __name__ == "__main__":
    main()
