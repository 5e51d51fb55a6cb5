"""``embedpool doctor``: what embedpool detected about this machine and what it will do.

``render_doctor(limits, plan)`` and ``render_devices(facts, placement)`` are pure functions to
plain text (the CLI prints them; tests compare them), so the report is exactly what the pool
will use, never a second guess::

    limits = detect_limits(max_memory=..., profile=..., cpus=...)
    devices = render_devices(detect_facts(...), place(model, device=...))
    print(render_doctor(limits, plan(limits, ...), mem_used=..., devices=devices))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from embedpool.config import format_bytes
from embedpool.device_choice import DeviceFacts
from embedpool.executors.pool.machine import Limits
from embedpool.executors.pool.plan import Plan
from embedpool.executors.pool.scaling import LOOKAHEAD_STEPS, SAMPLE_INTERVAL_S

if TYPE_CHECKING:
    from embedpool.placement import Placement


def render_devices(
    facts: DeviceFacts, placement: Placement | None, error: str | None = None
) -> list[str]:
    """The device part of the report: the ONNX Runtime packages, the driver, every GPU with
    its memory, where the model would run, and the GPU plan (or the error that stops it)."""
    dists = ", ".join(f"{n} {v}" for n, v in facts.distributions) or "none installed"
    lines = [f"  onnxruntime {dists}  (package metadata)"]
    lines.append(
        f"  driver      NVIDIA {facts.driver}  (source: {facts.driver_source})"
        if facts.driver
        else "  driver      no NVIDIA driver (nvidia-smi, /proc/driver/nvidia, libcuda: none found)"
    )
    for g in facts.gpus:
        free = format_bytes(g.memory_free) if g.memory_free is not None else "unknown"
        total = format_bytes(g.memory_total) if g.memory_total else "unknown"
        lines.append(
            f"  gpu {g.index}       {g.name}: {total} total, {free} free"
            + (f"  (nvidia-smi index {g.smi_index})" if g.smi_index != g.index else "")
        )
    if facts.all_gpus > len(facts.gpus):
        lines.append(
            f"  hidden      {facts.all_gpus - len(facts.gpus)} GPU(s) not in "
            f"CUDA_VISIBLE_DEVICES={facts.cuda_visible_devices!r}"
        )
    if error is not None:
        lines.append(f"  device      error: {error}")
        return lines
    if placement is None:
        return lines
    lines.append(f"  device      {placement.describe()}")
    if placement.runtime_reason:
        lines.append(
            f"  engine      {placement.runtime}, {placement.precision}  "
            f"(why: {placement.runtime_reason})"
        )
    d = placement.devices
    if d is not None:
        for w in d.gpu_workers:
            cap = format_bytes(w.mem_limit) if w.mem_limit is not None else "none"
            lines.append(
                f"  gpu plan    cuda:{w.index}: 1 worker, {w.batch_tokens} padded tokens "
                f"per batch, ORT arena cap {cap}"
            )
        lines.append(
            f"  gpu plan    {d.cpu_workers} CPU worker(s) alongside, {d.parent_cores} "
            f"core(s) for the parent (tokenising) of {d.cpus}; job batches of "
            f"{placement.batch_tokens} tokens, {placement.max_batch_items} items"
        )
        lines += [f"    - {r}" for r in d.reasons]
    lines += [f"  note        {n}" for n in placement.device.notes]
    return lines


def render_doctor(
    limits: Limits,
    plan: Plan,
    *,
    mem_used: int | None = None,
    devices: Sequence[str] = (),
    graphs: tuple[Path, Sequence[tuple[str, int]]] | None = None,
    model: str | None = None,
    other_graphs: int = 0,
) -> str:
    """The doctor's report: cores, memory, profile (each with its source), the planned
    workers x threads, batch budget, thresholds, and every reason behind them; ``devices``:
    the lines of ``render_devices``; ``graphs``: the graph cache directory and the (file
    name, bytes) of each graph of ``model`` built in it; ``other_graphs``: how many graphs of
    other models it holds (counted, not listed)."""
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
        lines.append(
            f"  in use      {format_bytes(mem_used)} ({mem_used / limits.real_memory_bytes:.0%} of "
            "the limit, all programs"
            + (
                ", measured in the cgroup)"
                if limits.memory_cgroup
                else ", host MemTotal - MemAvailable)"
            )
        )
    if limits.pool_memory_bytes is not None:
        lines.append(
            f"  pool cap    {format_bytes(limits.pool_memory_bytes)} for embedpool's own RSS "
            f"(supervisor + workers)  (source: {limits.memory_source})"
        )
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
        lines.append(
            f"  cgroup      memory v{limits.memory_cgroup.version} at {limits.memory_cgroup.path}"
        )
    if limits.cpu_cgroup is not None:
        lines.append(f"  cgroup      cpu v{limits.cpu_cgroup.version} at {limits.cpu_cgroup.path}")
    lines += list(devices)
    if graphs is not None:
        where, built = graphs
        of = f" for {model}" if model else ""
        lines.append(
            f"  graphs      {len(built)} built{of} in {where}"
            + (
                ""
                if built
                else " (a first run builds its graph: `embedpool models "
                "build` does it ahead of time)"
            )
        )
        lines += [f"                {name}  {format_bytes(size)}" for name, size in built]
        if other_graphs:
            lines.append(f"                and {other_graphs} graph(s) of other models")
    lines.append("why:")
    lines += [f"  - {r}" for r in plan.reasons]
    lines += [f"  - note: {n}" for n in limits.notes]
    return "\n".join(lines) + "\n"
