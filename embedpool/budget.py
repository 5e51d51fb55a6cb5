"""The batch budget: how many padded tokens (and items) one batch may hold, decided once.

One pure function, ``batch_budget``, takes the device, the profile, the model's max length and
what the user asked for, and returns the budget, the floor an out-of-memory failure may lower
it to, the item cap and the reason. Every place that cuts or sizes batches takes its numbers
from it, so ``embedpool doctor`` prints the plan that ``embed`` and ``serve`` run::

    batch_budget(device, profile, max_length, requested, gpu_fit) -> BatchBudget
        placement.place        the job's and the server's batches (Placement.budget)
        gpuplan.gpu_batch_tokens   a GPU's budget from the tokens its free memory holds
        plan.plan              the pool's budget in force at start and its OOM floor
        RayExecutor            its starting budget and OOM floor
        server settings        the server's batcher (from the placement, like the job)

Why these numbers:

- **CPU: 512 padded tokens** (= 2 x 256). Small batches are faster and lighter: one pool
  worker (1 thread, int8, ``benchmarks/worker_rss.py``) peaked at 124 / 136 / 146 / 190 MiB
  with batches of 2 / 3 / 4 / 8 x 256 tokens. Whole pools (``embedpool bench --batch-tokens
  N``, 2 workers x 1 thread, int8 with flash attention, AMD EPYC Zen 3, four alternating
  rounds): 512 against 768 gave 22.8 against 22.0 chunks/s on the 600-chunk built-in corpus
  (95% truncated at 256 tokens) and 204 against 182 on 2,053 short texts (mean 32 tokens);
  five rounds of 256 / 512 / 768 on 300 chunks gave 22.7 / 22.5 / 21.2, and 1,536 and 3,072
  were slower still (the activations of a smaller batch stay in the core's caches). 512
  rather than 256: the same speed on long texts, with half as many runs (each with its fixed
  per-run cost) on short ones.
- **wsl2 halves it to 256**: WSL2's VM gets half the host's RAM and hands freed memory back to
  Windows lazily, and a WSL OOM takes the whole distro down; a smaller spike per batch costs
  little speed (above) and leaves more headroom.
- **A GPU's budget comes from its free memory** (``gpuplan`` computes the tokens that fit),
  rounded down to whole sequences of the model's max length, capped at ``GPU_MAX_BATCH_TOKENS``.
- **The floor** is one full-length sequence of the default model (256 tokens; on a GPU the
  model's max length if longer): the smallest batch that holds any input whole, since a
  longer sequence runs alone anyway. A requested budget below it is its own floor.
- **What the user asked for** (``--batch-tokens``) wins on the CPU; on a GPU it is capped at
  what the GPU's memory holds, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from embedpool.errors import ConfigError
from embedpool.types import Profile

#: The CPU's padded tokens per batch (see the module docstring).
DEFAULT_BATCH_TOKENS = 512
#: Item cap on the CPU: protects against thousands of 3-token texts in one batch (per-row
#: overhead).
DEFAULT_MAX_BATCH_ITEMS = 64
#: Per profile on the CPU: wsl2 halves the default (see the module docstring).
PROFILE_BATCH_TOKENS: dict[Profile, int] = {
    "cloud": DEFAULT_BATCH_TOKENS,
    "local": DEFAULT_BATCH_TOKENS,
    "wsl2": DEFAULT_BATCH_TOKENS // 2,
}
#: The floor an out-of-memory failure lowers a budget to: one full-length sequence of the
#: default model.
MIN_BATCH_TOKENS = 256
#: Most padded tokens in one GPU batch: 256 sequences of 256 tokens, the batch the
#: sentence-transformers comparison runs. Larger batches add latency and host memory for the
#: batch's ids and vectors; a model of MiniLM's size keeps the GPU busy well below this (not
#: measured here).
GPU_MAX_BATCH_TOKENS = 65536
#: Items per GPU batch (the CPU's is 64): short texts need many rows to fill a GPU batch.
GPU_MAX_BATCH_ITEMS = 1024
#: The smallest GPU budget worth running: one full-length sequence of the default model (a
#: model with a longer window needs that window).
GPU_MIN_BATCH_TOKENS = 256
#: The budget when the GPU's free memory is unknown (nvidia-smi missing): ORT's arena then has
#: no cap, and a too-big batch fails as an out-of-memory error and is split.
GPU_UNKNOWN_MEMORY_TOKENS = 16384

DeviceKind = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class BatchBudget:
    """Padded tokens and items per batch, the floor an OOM may lower ``tokens`` to, and why.
    ``tokens`` 0 only for a GPU that cannot hold one full-length sequence (``fits``)."""

    tokens: int
    floor: int
    max_items: int
    reason: str

    @property
    def fits(self) -> bool:
        return self.tokens > 0

    def describe(self) -> str:
        """One line for the doctor and the plan's reasons."""
        return (
            f"batch budget {self.tokens} padded tokens, {self.max_items} items (an OOM "
            f"halves it, never below {self.floor}): {self.reason}"
        )


def batch_budget(
    *,
    device: DeviceKind = "cpu",
    profile: Profile | None = None,
    max_length: int | None = None,
    requested: int | None = None,
    requested_items: int | None = None,
    gpu_fit: int | None = None,
) -> BatchBudget:
    """The batch budget (rules in the module docstring). ``profile``: the machine's, None where
    none applies (Ray actors); ``max_length``: the model's; ``requested``/``requested_items``:
    ``--batch-tokens`` and the item cap asked for; ``gpu_fit`` (``device="cuda"``): the padded
    tokens the GPU's free memory holds (``gpuplan``), None when its free memory is unknown."""
    for name, value in (("batch_tokens", requested), ("max_batch_items", requested_items)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if device == "cuda":
        return _gpu_budget(max_length, requested, requested_items, gpu_fit)
    items = requested_items or DEFAULT_MAX_BATCH_ITEMS
    if requested is not None:
        return BatchBudget(
            requested, min(MIN_BATCH_TOKENS, requested), items, "as requested (--batch-tokens)"
        )
    tokens = PROFILE_BATCH_TOKENS[profile or "local"]
    if profile == "wsl2":
        why = (
            f"the wsl2 profile halves the default {DEFAULT_BATCH_TOKENS} (WSL2's VM returns "
            "memory to Windows lazily: smaller spikes)"
        )
    else:
        why = "small batches are as fast as big ones on the CPU and lighter" + (
            f" ({profile} profile)" if profile else ""
        )
    return BatchBudget(tokens, min(MIN_BATCH_TOKENS, tokens), items, why)


def _gpu_budget(
    max_length: int | None, requested: int | None, requested_items: int | None, fit: int | None
) -> BatchBudget:
    floor = max(GPU_MIN_BATCH_TOKENS, max_length or 0)
    items = requested_items or GPU_MAX_BATCH_ITEMS
    if fit is None:
        tokens = GPU_UNKNOWN_MEMORY_TOKENS
        why = "free GPU memory unknown"
    elif fit < floor:
        return BatchBudget(
            0,
            floor,
            items,
            f"the GPU's free memory holds {fit} tokens, under one {floor}-token sequence",
        )
    elif fit >= GPU_MAX_BATCH_TOKENS:
        tokens, why = GPU_MAX_BATCH_TOKENS, f"the cap; the GPU's free memory holds {fit}"
    else:
        tokens = fit // floor * floor  # whole sequences of the longest length
        why = f"the GPU's free memory holds {fit} tokens, in whole {floor}-token sequences"
    if requested is None:
        return BatchBudget(tokens, floor, items, why)
    if fit is not None and requested > fit:  # more than the GPU's memory holds
        tokens = fit // floor * floor
        return BatchBudget(
            tokens,
            floor,
            items,
            f"--batch-tokens {requested} capped: the GPU's free memory holds {fit} tokens",
        )
    return BatchBudget(requested, min(floor, requested), items, "as requested (--batch-tokens)")
