"""The adaptive local worker pool, one concept per module::

    pool.py       Pool: the facade (submit, run, stats, broken, close)
    manager.py    the manager thread: pipes, sentinels, deadlines, scaling; one verb per step
    worker.py     worker_main: the worker process (engine, Embed -> Result, never an orphan)
    protocol.py   the wire messages, a handful of frozen dataclasses
    config.py     PoolConfig: every knob, validated
    autoscaler.py the manager's seam to the scaling policy (the values in force)
    plan.py       the plan: limits and options in, the policy's numbers and reasons out (pure)
    memory.py     the memory model: one worker's RSS from its model and batch budget (pure)
    scaling.py    the policy's state machine: readings in, workers and budget in force out (pure)
    machine.py    Limits and Reading: the policy's input types (no process code)
    limits.py     what this machine allows (CPUs, memory, profile), read once
    cgroups.py    reading cgroups: limits, usage, the OOM killer's counter
    readings.py   live readings: memory in use, RSS, CPU shares

What a failure means is ``embedpool/faults.py``'s, shared with the other executors.
"""
