"""Dev benchmark: the XLM-RoBERTa, NomicBert, ModernBERT and Gemma 3 families at their real
models' sizes (random weights: speed and memory do not depend on the values), per graph variant:

    .venv/bin/python benchmarks/families.py [--quick] [--families xlmr,nomic,modernbert]
        [--variants fp32,int8,fp32-mha,fp32-plain] [--lengths 256,2048] [--threads 1]
        [--rss-lengths 256,2048,max] [--rss-variants fp32,int8] [--repeat 3]
        [--chunks 24] [--long-chunks 3] [--attention]

Shapes: multilingual-e5-small (XLM-R, 12 x 384, 250k vocab, 512 tokens),
nomic-embed-text-v1.5 (NomicBert, 12 x 768, 8,192 tokens), gte-modernbert-base
(ModernBERT, 22 x 768, 8,192 tokens, 128-token local windows) and embeddinggemma-300m
(Gemma 3, 24 x 768, 262k vocab, 2,048 tokens, 512-token local windows, its two Dense
modules), written as model directories (config.json in the hub's format, model.safetensors, the fixture's small tokenizer) in a
temporary directory, then resolved and built by embedpool like any model.

Variants: ``fp32`` and ``int8`` are what prepare_onnx ships (fused; rotary families use
MultiHeadAttention without a mask, i.e. ONNX Runtime's FlashAttention path, and block-local
attention for windows); ``fp32-mha`` is the fused graph with MultiHeadAttention's masked
kernel (and a [seq, seq] window bias); ``fp32-plain`` is the unfused graph (standard ops,
Softmax attention). XLM-R's layers are BERT's, so it has no ``fp32-mha``.

Speed: random-id sequences of each ``--lengths`` (capped at the model's max length), in
batches of ``768 // length`` sequences (embedpool's default token budget; at least one),
embedded by an in-process engine with ``--threads`` intra-op threads; the best of
``--repeat`` rounds of ``--chunks`` (``--long-chunks`` above 512 tokens) chunks, as chunks
per wall second and per CPU second of the process (with 1 thread, the engine's own work:
the measure that holds on a shared machine), and the CPU-second ratio to the first variant.
All variants of a family run interleaved in the same process, so they see the same machine.

Memory: one real pool worker per variant (spawned as the supervisor spawns it) embeds one
batch per ``--rss-lengths`` (``max`` = the model's max length, one sequence); its VmHWM is
read from /proc after each batch (reset before it), next to its RSS once loaded, and the
engine seconds the worker reports for each batch.

``--attention`` instead measures one 12-head, 64-dim attention alone at 256, 2,048 and 8,192
tokens, each variant in a fresh process: MultiHeadAttention without a mask (FlashAttention,
with the extra padding dimension embedpool adds), with a padding mask, and Softmax
attention in standard ops: seconds and peak RSS above the process's before the run.

``--quick`` uses the committed fixtures (tiny models) and short lengths: a check that the
script runs, not a measurement. Numbers are for the record only on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "families"
#: The batch token budget the README's families table was measured at (the default then).
BUDGET = 768
READY_TIMEOUT_S = 600.0
BATCH_TIMEOUT_S = 1800.0

#: The real models' shapes, as their hub config.json files state them.
SHAPES: dict[str, dict[str, Any]] = {
    "xlmr": {  # intfloat/multilingual-e5-small
        "model_type": "xlm-roberta",
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "vocab_size": 250037,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "pad_token_id": 1,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "max_seq_length": 512,
    },
    "nomic": {  # nomic-ai/nomic-embed-text-v1.5
        "n_embd": 768,
        "n_head": 12,
        "n_layer": 12,
        "n_inner": 3072,
        "n_positions": 8192,
        "vocab_size": 30528,
        "type_vocab_size": 2,
        "rotary_emb_base": 1000,
        "max_seq_length": 8192,
    },
    "modernbert": {  # Alibaba-NLP/gte-modernbert-base
        "hidden_size": 768,
        "num_hidden_layers": 22,
        "num_attention_heads": 12,
        "intermediate_size": 1152,
        "vocab_size": 50368,
        "max_position_embeddings": 8192,
        "local_attention": 128,
        "global_attn_every_n_layers": 3,
        "global_rope_theta": 160000.0,
        "local_rope_theta": 10000.0,
        "max_seq_length": 8192,
    },
    "gemma3": {  # google/embeddinggemma-300m (then Dense 768 -> 3072 -> 768)
        "hidden_size": 768,
        "intermediate_size": 1152,
        "num_hidden_layers": 24,
        "num_attention_heads": 3,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "vocab_size": 262144,
        "max_position_embeddings": 2048,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "max_seq_length": 2048,
    },
}
#: Dense modules after pooling, (in, out) per module, where the real model has them.
DENSE: dict[str, list[tuple[int, int]]] = {"gemma3": [(768, 3072), (3072, 768)]}


# --- random-weight models of the real size -------------------------------------------------


def _tensors(family: str, c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a checkpoint of ``family`` with config ``c``."""
    if family == "xlmr":
        h, i = c["hidden_size"], c["intermediate_size"]
        out: dict[str, tuple[int, ...]] = {
            "embeddings.word_embeddings.weight": (c["vocab_size"], h),
            "embeddings.position_embeddings.weight": (c["max_position_embeddings"], h),
            "embeddings.token_type_embeddings.weight": (c["type_vocab_size"], h),
            "embeddings.LayerNorm.weight": (h,),
            "embeddings.LayerNorm.bias": (h,),
        }
        for n in range(c["num_hidden_layers"]):
            p = f"encoder.layer.{n}."
            for key, shape in (
                ("attention.self.query", (h, h)),
                ("attention.self.key", (h, h)),
                ("attention.self.value", (h, h)),
                ("attention.output.dense", (h, h)),
                ("intermediate.dense", (i, h)),
                ("output.dense", (h, i)),
            ):
                out[p + key + ".weight"], out[p + key + ".bias"] = shape, shape[:1]
            for key in ("attention.output.LayerNorm", "output.LayerNorm"):
                out[p + key + ".weight"], out[p + key + ".bias"] = (h,), (h,)
        return out
    if family == "nomic":
        h, i = c["n_embd"], c["n_inner"]
        out = {
            "embeddings.word_embeddings.weight": (c["vocab_size"], h),
            "embeddings.token_type_embeddings.weight": (c["type_vocab_size"], h),
            "emb_ln.weight": (h,),
            "emb_ln.bias": (h,),
        }
        for n in range(c["n_layer"]):
            p = f"encoder.layers.{n}."
            out.update(
                {
                    p + "attn.Wqkv.weight": (3 * h, h),
                    p + "attn.out_proj.weight": (h, h),
                    p + "mlp.fc11.weight": (i, h),
                    p + "mlp.fc12.weight": (i, h),
                    p + "mlp.fc2.weight": (h, i),
                }
            )
            for key in ("norm1", "norm2"):
                out[p + key + ".weight"], out[p + key + ".bias"] = (h,), (h,)
        return out
    if family == "gemma3":
        h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
        q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
        out = {"embed_tokens.weight": (c["vocab_size"], h), "norm.weight": (h,)}
        for n in range(c["num_hidden_layers"]):
            p = f"layers.{n}."
            out.update(
                {
                    p + "self_attn.q_proj.weight": (q, h),
                    p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.o_proj.weight": (h, q),
                    p + "self_attn.q_norm.weight": (hd,),
                    p + "self_attn.k_norm.weight": (hd,),
                    p + "mlp.gate_proj.weight": (i, h),
                    p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i),
                }
            )
            for key in (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ):
                out[p + key + ".weight"] = (h,)
        return out
    h, i = c["hidden_size"], c["intermediate_size"]
    out = {
        "embeddings.tok_embeddings.weight": (c["vocab_size"], h),
        "embeddings.norm.weight": (h,),
        "final_norm.weight": (h,),
    }
    for n in range(c["num_hidden_layers"]):
        p = f"layers.{n}."
        out.update(
            {
                p + "attn.Wqkv.weight": (3 * h, h),
                p + "attn.Wo.weight": (h, h),
                p + "mlp_norm.weight": (h,),
                p + "mlp.Wi.weight": (2 * i, h),
                p + "mlp.Wo.weight": (h, i),
            }
        )
        if n:
            out[p + "attn_norm.weight"] = (h,)
    return out


def make_model(family: str, root: Path) -> Path:
    """A model directory of the real model's shape: the fixture's files (tokenizer,
    sentence-transformers modules), its config.json updated to the real sizes, and random
    weights (matrices N(0, 1/fan_in), norms 1, biases 0)."""
    from safetensors.numpy import save_file

    shape = dict(SHAPES[family])
    max_seq = shape.pop("max_seq_length")
    dst = root / family
    shutil.copytree(FIXTURES / family / "model", dst)
    config = {**json.loads((dst / "config.json").read_text()), **shape}
    config.pop("layer_types", None)  # ModernBERT: derived from global_attn_every_n_layers
    config.pop("rope_parameters", None)
    (dst / "config.json").write_text(json.dumps(config))
    st = json.loads((dst / "sentence_bert_config.json").read_text())
    (dst / "sentence_bert_config.json").write_text(json.dumps({**st, "max_seq_length": max_seq}))
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    if "model_max_length" in tok_cfg:  # sentence-transformers 6's saves: it wins
        (dst / "tokenizer_config.json").write_text(
            json.dumps({**tok_cfg, "model_max_length": max_seq})
        )
    pooling = dst / "1_Pooling" / "config.json"
    width = config.get("hidden_size", config.get("n_embd"))
    pooled = json.loads(pooling.read_text())
    dim_key = (
        "embedding_dimension" if "embedding_dimension" in pooled else "word_embedding_dimension"
    )
    pooling.write_text(json.dumps({**pooled, dim_key: width}))
    rng = np.random.default_rng(0)
    for n, (d_in, d_out) in enumerate(DENSE.get(family, ())):
        ddir = dst / f"{n + 2}_Dense"
        dcfg = json.loads((ddir / "config.json").read_text())
        (ddir / "config.json").write_text(
            json.dumps({**dcfg, "in_features": d_in, "out_features": d_out})
        )
        w = rng.standard_normal((d_out, d_in), dtype=np.float32) * np.float32(1 / np.sqrt(d_in))
        save_file({"linear.weight": w}, str(ddir / "model.safetensors"))
    weights: dict[str, np.ndarray] = {}
    for key, dims in _tensors(family, config).items():
        if len(dims) == 1:
            weights[key] = (np.ones if key.endswith("weight") else np.zeros)(dims, np.float32)
        else:
            w = rng.standard_normal(dims, dtype=np.float32)
            w *= np.float32(1 / np.sqrt(dims[1]))
            weights[key] = w
    save_file(weights, str(dst / "model.safetensors"))
    return dst


# --- graph variants ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PathSpec:
    """An engine recipe for a graph file that prepare_onnx does not ship (pickled to workers)."""

    path: Path
    model: Any  # the ResolvedModel it was built from
    threads: int = 1

    def build(self) -> Any:
        from embedpool.engine import Engine

        return Engine.for_model(self.path, self.model, threads=self.threads)


def variant_specs(model: Any, variants: list[str], tmp: Path, threads: int) -> dict[str, Any]:
    """Engine recipes per variant; the shipped ones are built (and cached) here first."""
    import onnx

    from embedpool.engine import EngineSpec
    from embedpool.graph import _family, prepare_onnx
    from embedpool.graph.compose import compose

    fam, cfg = _family(model)
    specs: dict[str, Any] = {}
    weights: dict[str, Any] | None = None
    for v in variants:
        if v in ("fp32", "int8"):
            t0 = time.perf_counter()
            built = prepare_onnx(model, v)  # type: ignore[arg-type]
            print(
                f"  built {v} in {time.perf_counter() - t0:.0f} s: "
                f"{built.stat().st_size / 2**20:.0f} MiB"
            )
            specs[v] = EngineSpec(model, v, threads)  # type: ignore[arg-type]
            continue
        if v == "fp32-mha" and fam.NAME == "xlm-roberta":
            continue  # BERT's layers: no alternative attention to compare
        weights = weights if weights is not None else fam.load_weights(model.weights_path, cfg)
        path = tmp / f"{model.name}-{v}.onnx"
        if v == "fp32-plain":
            graph = compose(fam, weights, cfg, model.head, fused=False)
        else:  # fp32-mha: the fused graph with the masked attention kernel
            wrapped = _with_attention(fam, "mha")
            graph = compose(wrapped, weights, cfg, model.head, fused=True)
        onnx.save(graph, str(path))
        specs[v] = PathSpec(path, model, threads)
    return specs


def _with_attention(fam: Any, kind: str) -> Any:
    """A stand-in for a family module whose build_encoder uses attention ``kind``."""
    import types

    def build_encoder(*args: Any, **kwargs: Any) -> Any:
        return fam.build_encoder(*args, attention=kind, **kwargs)

    ns = types.SimpleNamespace(**{k: getattr(fam, k) for k in dir(fam) if not k.startswith("__")})
    ns.build_encoder = build_encoder
    return ns


# --- speed ---------------------------------------------------------------------------------------


def random_batches(length: int, count: int, vocab: int, seed: int) -> list[list[np.ndarray]]:
    """``count`` chunks of ``length`` random ids (special tokens excluded), in batches of
    the default budget."""
    rng = np.random.default_rng(seed)
    per = max(1, BUDGET // length)
    chunks = [rng.integers(5, vocab, length).astype(np.int32) for _ in range(count)]
    return [chunks[i : i + per] for i in range(0, count, per)]


def speed(
    engines: dict[str, Any], length: int, count: int, vocab: int, repeat: int
) -> dict[str, tuple[float, float]]:
    """Per variant, the best of ``repeat`` rounds: (chunks per wall second, chunks per CPU
    second of this process). With one intra-op thread ONNX Runtime computes on the calling
    thread, so CPU seconds are the engine's own work: the measure that holds while other jobs
    share the cores (wall seconds then include the time the scheduler gave to them)."""
    batches = random_batches(length, count, vocab, seed=length)
    best = {v: (0.0, 0.0) for v in engines}
    for e in engines.values():
        e.embed(batches[0])  # warm-up: first-run allocations and lazy kernels
    for _ in range(repeat):
        for v, e in engines.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                e.embed(b)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[v] = (max(best[v][0], count / wall), max(best[v][1], count / cpu))
    return best


# --- worker memory -------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) / 1024
    return out


def worker_peaks(spec: Any, lengths: list[int], vocab: int) -> dict[str, float]:
    """MiB: RSS once loaded, then the peak of one batch per length."""
    from embedpool.executors.pool.protocol import Embed, Ready, Result
    from embedpool.testing import spawn_worker

    proc, parent = spawn_worker(spec, {})
    try:
        if not parent.poll(READY_TIMEOUT_S):
            raise TimeoutError("worker not ready")
        ready = parent.recv()
        if not isinstance(ready, Ready):
            raise RuntimeError(f"worker failed: {ready}")
        row = {"load": _status(ready.pid)["VmRSS"]}
        for task, length in enumerate(lengths, 1):
            batch = random_batches(length, max(1, BUDGET // length), vocab, seed=task)[0]
            with open(f"/proc/{ready.pid}/clear_refs", "w") as f:
                f.write("5")
            parent.send(Embed(task, tuple(batch)))
            if not parent.poll(BATCH_TIMEOUT_S):
                raise TimeoutError(f"batch of {length} tokens timed out")
            res = parent.recv()
            if not isinstance(res, Result):
                raise RuntimeError(f"batch of {length} tokens failed: {res}")
            row[f"peak@{length}"] = _status(ready.pid)["VmHWM"]
            row[f"s@{length}"] = res.seconds
        return row
    finally:
        parent.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


# --- one attention alone -------------------------------------------------------------------------


def _attention_run(seq: int, variant: str, out: Any) -> None:
    """In a fresh process: one attention of ``variant`` at ``seq`` tokens; sends (s, MB)."""
    import resource

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    heads, hd = 12, 64
    d = heads * hd
    dq = heads * (hd + 1) if variant == "flash" else d
    vi = helper.make_tensor_value_info
    inputs = [
        vi("q", TensorProto.FLOAT, [1, seq, dq]),
        vi("k", TensorProto.FLOAT, [1, seq, dq]),
        vi("v", TensorProto.FLOAT, [1, seq, d]),
    ]
    inits: list[Any] = []
    rng = np.random.default_rng(0)
    feed = {
        "q": rng.standard_normal((1, seq, dq), dtype=np.float32),
        "k": rng.standard_normal((1, seq, dq), dtype=np.float32),
        "v": rng.standard_normal((1, seq, d), dtype=np.float32),
    }
    if variant == "plain":
        inputs.append(vi("bias", TensorProto.FLOAT, [1, 1, 1, seq]))
        feed["bias"] = np.zeros((1, 1, 1, seq), np.float32)
        inits = [
            numpy_helper.from_array(np.array([0, 0, heads, hd], np.int64), "split"),
            numpy_helper.from_array(np.array([0, 0, -1], np.int64), "merge"),
            numpy_helper.from_array(np.array(hd**-0.5, np.float32), "scale"),
        ]
        mk = helper.make_node
        nodes = [
            mk("Reshape", ["q", "split"], ["q4"]),
            mk("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
            mk("Reshape", ["k", "split"], ["k4"]),
            mk("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
            mk("Reshape", ["v", "split"], ["v4"]),
            mk("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
            mk("MatMul", ["qt", "kt"], ["s"]),
            mk("Mul", ["s", "scale"], ["s2"]),
            mk("Add", ["s2", "bias"], ["s3"]),
            mk("Softmax", ["s3"], ["p"], axis=-1),
            mk("MatMul", ["p", "vt"], ["c"]),
            mk("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]),
            mk("Reshape", ["ct", "merge"], ["out"]),
        ]
    else:
        names = ["q", "k", "v"]
        attrs: dict[str, Any] = {"num_heads": heads}
        if variant == "mha":
            inputs.append(vi("mask", TensorProto.INT32, [1, seq]))
            feed["mask"] = np.ones((1, seq), np.int32)
            names += ["", "mask"]
        else:
            attrs["scale"] = hd**-0.5
        nodes = [
            helper.make_node("MultiHeadAttention", names, ["out"], domain="com.microsoft", **attrs)
        ]
    graph = helper.make_graph(
        nodes, "attention", inputs, [vi("out", TensorProto.FLOAT, None)], initializer=inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_mem_pattern = False
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    sess.run(None, feed)
    seconds = time.perf_counter() - t0
    out.send((seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))


def attention_table(lengths: list[int]) -> None:
    ctx = multiprocessing.get_context("spawn")
    print(f"{'tokens':>7} {'variant':8} {'seconds':>8} {'+peak MB':>9}")
    for seq in lengths:
        for variant in ("flash", "mha", "plain"):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_attention_run, args=(seq, variant, child))
            proc.start()
            seconds, mb = parent.recv()
            proc.join()
            print(f"{seq:7d} {variant:8} {seconds:8.2f} {mb:9.0f}")


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny fixtures, short lengths")
    ap.add_argument("--families", default="xlmr,nomic,modernbert")
    ap.add_argument("--variants", default="fp32,int8,fp32-mha,fp32-plain")
    ap.add_argument("--lengths", default="256,2048")
    ap.add_argument("--rss-lengths", default="256,2048,max")
    ap.add_argument(
        "--rss-variants",
        default=None,
        help="variants whose worker memory is measured (default: all; '' for none)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=24, help="chunks per round up to 512 tokens")
    ap.add_argument("--long-chunks", type=int, default=3, help="chunks per round above 512")
    ap.add_argument("--attention", action="store_true", help="one attention op alone")
    args = ap.parse_args()
    if args.attention:
        attention_table([64, 128] if args.quick else [256, 2048, 8192])
        return
    from embedpool.models import resolve_model

    with tempfile.TemporaryDirectory(prefix="embedpool-families-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["EMBEDPOOL_CACHE_DIR"] = str(tmp / "cache")  # workers inherit it
        variants = args.variants.split(",")
        for family in args.families.split(","):
            directory = FIXTURES / family / "model" if args.quick else make_model(family, tmp)
            model = resolve_model(directory)
            vocab = int(model.config.get("vocab_size", 0))
            print(
                f"\n== {family}: {SHAPES[family] if not args.quick else 'fixture'} "
                f"(max length {model.max_length}, {args.threads} thread(s))"
            )
            specs = variant_specs(model, variants, tmp, args.threads)
            top = model.max_length
            lengths = sorted({min(int(x), top) for x in args.lengths.split(",") if x})
            engines = {v: s.build() for v, s in specs.items()} if lengths else {}
            if lengths:
                print(
                    "chunks per wall second / per CPU second, and CPU-second speed against "
                    f"{variants[0]}"
                )
                print(f"{'':>10} " + " ".join(f"{v:>24}" for v in specs))
            for length in lengths:
                count = (
                    (6 if args.quick else args.chunks)
                    if length <= 512
                    else (1 if args.quick else args.long_chunks)
                )
                row = speed(engines, length, count, vocab, 1 if args.quick else args.repeat)
                ref = row[next(iter(specs))][1]
                print(
                    f"{length:>6} tok "
                    + " ".join(
                        f"{row[v][0]:8.4g} /{row[v][1]:8.4g} {row[v][1] / ref:5.2f}x" for v in specs
                    )
                )
            del engines
            rss_lengths = sorted(
                {top if x == "max" else min(int(x), top) for x in args.rss_lengths.split(",")}
            )
            if args.rss_variants == "":
                continue
            print(
                f"{'worker MiB':>10} {'load':>8} "
                + " ".join(f"{'peak@' + str(n):>10}" for n in rss_lengths)
                + "   (seconds per batch)"
            )
            rss_variants = (
                list(specs)
                if args.rss_variants is None
                else [v for v in args.rss_variants.split(",") if v in specs]
            )
            for v in rss_variants:
                spec = specs[v]
                peaks = worker_peaks(spec, rss_lengths, vocab)
                print(
                    f"{v:>10} {peaks['load']:8.0f} "
                    + " ".join(f"{peaks[f'peak@{n}']:10.0f}" for n in rss_lengths)
                    + "   ("
                    + " ".join(f"{peaks[f's@{n}']:.1f}" for n in rss_lengths)
                    + ")"
                )


if __name__ == "__main__":
    main()
