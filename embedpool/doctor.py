"""``embedpool doctor``: what embedpool detected about this machine and what it will do.

``render_doctor(limits, plan)`` is a pure function to plain text (the CLI prints it; tests
compare it), so the report is exactly what the pool will use, never a second guess::

    limits = detect_limits(max_memory=..., profile=..., cpus=...)
    print(render_doctor(limits, plan(limits, workers=..., mem_used=memory_used(limits))))
"""

from __future__ import annotations

from embedpool.config import format_bytes
from embedpool.pool.machine import Limits
from embedpool.pool.scaling import LOOKAHEAD_STEPS, SAMPLE_INTERVAL_S, Plan


def render_doctor(limits: Limits, plan: Plan, *, mem_used: int | None = None) -> str:
    """The doctor's report: cores, memory, profile (each with its source), the planned
    workers x threads, batch budget, thresholds, and every reason behind them."""
    p = plan.policy
    lines = [
        "embedpool doctor",
        f"  cores       {limits.cpus} usable  (source: {limits.cpus_source}; host has "
        f"{limits.host_cpus or '?'})",
        f"  memory      {format_bytes(limits.real_memory_bytes)} limit  (source: "
        f"{limits.real_memory_source}; host has "
        f"{format_bytes(limits.host_memory_bytes) if limits.host_memory_bytes else '?'})",
    ]
    if mem_used is not None:
        lines.append(f"  in use      {format_bytes(mem_used)} ({mem_used / limits.real_memory_bytes:.0%} of "
                     "the limit, all programs" + (", measured in the cgroup)"
                                                  if limits.memory_cgroup else
                                                  ", host MemTotal - MemAvailable)"))
    if limits.pool_memory_bytes is not None:
        lines.append(f"  pool cap    {format_bytes(limits.pool_memory_bytes)} for embedpool's own RSS "
                     f"(supervisor + workers)  (source: {limits.memory_source})")
    lines += [
        f"  profile     {limits.profile}  (why: {limits.profile_source})",
        f"  workers     start {p.start_workers}, at most {p.max_workers} x {p.threads_per_worker} "
        f"thread(s) each  ({p.max_workers * p.threads_per_worker} of {limits.cpus} cores)",
        f"  batches     {p.batch_tokens} padded tokens per batch (halved after an OOM kill, "
        f"never below {p.min_batch_tokens})",
        f"  memory      stop growing and shrink at {p.mem_stop:.0%}, grow again below "
        f"{p.mem_resume:.0%}  (now and {LOOKAHEAD_STEPS} x {SAMPLE_INTERVAL_S:g} s ahead)",
        f"  cpu         others' load stops growth at {p.cpu_stop:.0%}, resumes below "
        f"{p.cpu_resume:.0%}",
        f"  worker RSS  ~{format_bytes(p.worker_mem_estimate)} assumed until measured",
        f"  emergency   after 2 consecutive OOM kills: 1 worker, {p.min_batch_tokens}-token "
        f"batches; leaves after {p.emergency_exit_s:g} s below {p.mem_resume:.0%}",
    ]
    if limits.memory_cgroup is not None:
        lines.append(f"  cgroup      memory v{limits.memory_cgroup.version} at "
                     f"{limits.memory_cgroup.path}")
    if limits.cpu_cgroup is not None:
        lines.append(f"  cgroup      cpu v{limits.cpu_cgroup.version} at {limits.cpu_cgroup.path}")
    lines.append("why:")
    lines += [f"  - {r}" for r in plan.reasons]
    lines += [f"  - note: {n}" for n in limits.notes]
    return "\n".join(lines) + "\n"
