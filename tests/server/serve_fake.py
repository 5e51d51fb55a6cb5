"""Run the server over a slow fake engine, as ``embedpool serve`` would (for the SIGTERM tests).

    python tests/server/serve_fake.py PORT DELAY_PER_BATCH_S [--ray] [--hold FILE]

``--ray`` runs the engine in one Ray actor of a private local Ray instance (the server starts
it and must stop it); ``--hold FILE`` makes every batch wait while FILE exists.
"""

from __future__ import annotations

import argparse

from server_support import DIM

from embedpool.executors.inprocess import InProcessExecutor
from embedpool.server import ServerSettings, run_server
from embedpool.testing import FakeEngineSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("delay", type=float)
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--hold", default=None)
    args = ap.parse_args()
    spec = FakeEngineSpec(dim=DIM, delay_per_batch_s=args.delay, hold_while_exists=args.hold)
    settings = ServerSettings(
        port=args.port, api_key="", graceful_timeout_s=30, log_level="warning"
    )
    if args.ray:
        from embedpool.server.on_ray import ray_executor_factory

        run_server(settings, ray_executor_factory(spec, actors=1))
    else:
        run_server(settings, lambda: InProcessExecutor(spec.build))


if __name__ == "__main__":
    main()
