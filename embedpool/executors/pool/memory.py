"""What one worker's memory is: the pool's memory model, pure and table-tested
(``tests/executors/pool/test_worker_memory.py``).

A worker's peak RSS is its runtime, its graph's weights and the activations of one batch of
the budget (``worker_mem_estimate``); ``plan.plan`` divides the memory it may use by it (the
weights counted once where the workers share them: ``shared_weight_bytes``), and
the manager's recycle rule (``faults.recycle_limit``) allows one batch's activations
(``activation_estimate``) above a worker's size when ready.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from embedpool.executors.pool.gpuplan import GPU_WORKER_HOST_RSS
from embedpool.types import Precision

MiB = 1024 * 1024

#: One worker's RSS with the default model once loaded (Python + numpy + ONNX Runtime + the
#: graph), measured here (benchmarks/worker_rss.py): int8 101 MiB, fp32 154 MiB.
WORKER_BASE_RSS: Mapping[Precision, int] = {"int8": 105 * MiB, "fp32": 160 * MiB}
#: Activation memory per padded token of a batch, on top of the base (ONNX Runtime's arena
#: keeps it between batches): measured 4x256 tokens +43 MiB (int8) / +38 (fp32), 8x256 +87 /
#: +76, 32x256 +346 / +305, so ~45 KiB/token. 64 KiB/token errs high: the estimate is only
#: used until the first reading shows real worker RSS, and erring high only costs a late
#: growth step.
ACTIVATION_PER_TOKEN = 64 * 1024


#: Per model (``ModelMemory``): a worker's RSS besides its graph's weights once loaded
#: (Python, numpy, ONNX Runtime, the worker): 64-66 MiB with the tiny test fixtures, 67-68
#: MiniLM (its base minus its graph file), 73 gte-modernbert-size, 91 nomic-size
#: (benchmarks/families.py). The largest, so that no worker is planned below its load.
RUNTIME_RSS = 90 * MiB
#: Activation bytes per padded token per unit of hidden / FFN width, besides attention
#: scores: ONNX Runtime's arena holds many [tokens, hidden] tensors (q, k, v, their rotated
#: and widened forms, context, residual sums, norms) and a few [tokens, ffn] ones. Fitted to
#: pool workers' peaks (benchmarks/families.py, AMD EPYC, 1 thread, fp32, random weights):
#: nomic-embed-text-v1.5's shape 68-70 KiB/token at 768, 2,048 and 8,192 tokens (estimate
#: 78), gte-modernbert-base's 60-64 (estimate 65), MiniLM's 39-44 (estimate 43).
ACTIVATION_PER_HIDDEN = 56
ACTIVATION_PER_FFN = 6
#: Bytes per attention score a kernel holds (fp32); the broadcast mask adds one "head".
SCORE_BYTES = 4


@dataclass(frozen=True)
class ModelMemory:
    """What one worker's memory depends on, per model and precision
    (``embedpool.graph.families.catalog.model_memory`` reads it from the model's files)."""

    weights: int  # bytes of the graph the worker loads
    hidden: int
    ffn: int  # width of the FFN's inner activations (2 x intermediate when gated)
    heads: int
    max_seq: int  # the model's max length
    #: Keys each query's scores span at once: None when the kernel holds every head's
    #: [seq, seq] scores (ONNX Runtime's masked Attention / MultiHeadAttention: the BERT
    #: family); else a constant, 0 for FlashAttention and 3 x the half-window for block-local
    #: attention (the rotary families: memory linear in seq, not quadratic).
    score_keys: int | None
    #: The graph's weights are a memory-mapped side file (``graph.external``, graphs above
    #: its ``EXTERNAL_MIN_BYTES``) that every worker maps from one page cache: counted once
    #: for the pool (``shared_weight_bytes``), not once per worker. Measured at
    #: Qwen3-Embedding-0.6B's int8 shape (benchmarks/decoders.py --rss): a second worker
    #: added its runtime and activations only.
    shared_weights: bool = False
    #: The runtime's activations against this model's (ONNX Runtime's): OpenVINO's
    #: (``runtimes.openvino_memory``) are larger.
    activation_factor: float = 1.0

    def activations(self, batch_tokens: int) -> int:
        """Activation bytes of the largest batch a worker gets under ``batch_tokens``: the
        budget or one max-length sequence, whichever is larger (the planner runs a longer
        sequence alone), its sequences as long as they can be (the worst case)."""
        tokens = max(batch_tokens, self.max_seq)
        keys = min(self.max_seq, tokens) if self.score_keys is None else self.score_keys
        per_token = (
            ACTIVATION_PER_HIDDEN * self.hidden
            + ACTIVATION_PER_FFN * self.ffn
            + SCORE_BYTES * (self.heads + 1) * keys
        )
        return int(per_token * tokens * self.activation_factor)


def activation_estimate(batch_tokens: int, model: ModelMemory | None = None) -> int:
    """Activation bytes of one batch under ``batch_tokens``: the model's (``ModelMemory``)
    or, without one, the default model's measured ACTIVATION_PER_TOKEN."""
    return ACTIVATION_PER_TOKEN * batch_tokens if model is None else model.activations(batch_tokens)


def worker_mem_estimate(
    precision: Precision, batch_tokens: int, model: ModelMemory | None = None, device: str = "cpu"
) -> int:
    """Peak RSS one worker is expected to reach: base + activations of one batch. ``model``:
    the runtime, the model's weights and its activations (a long-context model's estimate
    is that of one max-length sequence, whatever the budget); else the default model's. A
    GPU worker (``device`` "cuda:N"): its libraries, with the weights and activations on
    the GPU (``gpuplan`` sizes its batches from the GPU's memory)."""
    if device != "cpu":
        return GPU_WORKER_HOST_RSS
    if model is None:
        return WORKER_BASE_RSS.get(precision, WORKER_BASE_RSS["fp32"]) + activation_estimate(
            batch_tokens
        )
    return RUNTIME_RSS + model.weights + model.activations(batch_tokens)


def shared_weight_bytes(model: ModelMemory | None, device: str = "cpu") -> int:
    """Bytes of ``worker_mem_estimate`` that every CPU worker shares (the mapped weights of
    ``ModelMemory.shared_weights``): the pool counts them once, and one more worker adds its
    estimate less them."""
    return model.weights if model is not None and model.shared_weights and device == "cpu" else 0


#: The supervisor: Python, numpy, the tokenizer, the queues. Counted when plan() is not told
#: the memory already in use.
SUPERVISOR_BASELINE = 150 * MiB
