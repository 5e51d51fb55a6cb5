"""Qwen3-Reranker pairs per second: embedpool's Reranker against sentence-transformers'
CrossEncoder (fp32, its defaults) on the same pairs, in one run, at Qwen3-Reranker-0.6B's
width with a few of its layers.

    python benchmarks/rerank_qwen3.py [--layers 4] [--queries 2] [--docs 8] [--rounds 2]
                                      [--threads 2] [--precisions int8,fp32] [--work DIR]

The model: a random-weight ``Qwen3ForCausalLM`` with Qwen3-Reranker-0.6B's block (hidden
1024, 16 query / 8 kv heads of 128, MLP 3072, untied lm_head) and ``--layers`` of its 28
layers (transformers' own initialisation: the fixtures' wide random weights overflow at
this width), the test fixture's small Qwen-style tokenizer (``make_reranker_fixtures
.qwen3_tokenizer``: ~800 tokens, so the token table is small and texts take more tokens than
Qwen's own tokenizer gives them) with the reranker's chat template and a 512-token window,
and lm_head's yes row along the last token's first principal component over the pairs
(``qwen3_head``), saved by CrossEncoder 6.3. Weights cannot be downloaded here.

Pairs, processes and measures are ``benchmarks/rerank.py``'s (its RUN_CE / RUN_EP): each
measurement its own process, alternating systems, pairs per wall second and per CPU second,
the ratio to CrossEncoder in the same run, fp32's largest |score difference| and int8's
Spearman per query against CrossEncoder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rerank import (  # benchmarks/ is not a package
    DEV_PYTHON,
    PROJECT_PYTHON,
    QUERIES,
    ROOT,
    RUN_CE,
    RUN_EP,
    cpu_name,
    run,
    spearman,
    stdlib_chunks,
)

MAKE = r"""
import json, shutil, sys
from pathlib import Path
import torch, transformers
from sentence_transformers import CrossEncoder
root, out, pairs_path, layers = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, str(root / "scripts"))
import make_reranker_fixtures as mrf
mrf.QWEN3_MAX_LEN = 512
torch.manual_seed(0)
tok = mrf.qwen3_tokenizer()
tok.chat_template = mrf.QWEN3_TEMPLATE
eid = tok.convert_tokens_to_ids("<|endoftext|>")
cfg = transformers.Qwen3Config(
    vocab_size=len(tok), hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
    max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, attention_bias=False,
    use_sliding_window=False, bos_token_id=eid, eos_token_id=eid, pad_token_id=eid)
model = transformers.Qwen3ForCausalLM(cfg)  # transformers' init (std 0.02): finite at this width
model.eval()
pairs = [tuple(p) for p in json.loads(pairs_path.read_text())]
mrf.qwen3_head(model, tok, pairs, tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no"))
tmp = out.parent / (out.name + ".hf")
shutil.rmtree(tmp, ignore_errors=True)
model.save_pretrained(str(tmp), safe_serialization=True)
tok.save_pretrained(str(tmp))
CrossEncoder(str(tmp), device="cpu").save(str(out))
shutil.rmtree(tmp)
print(json.dumps({"layers": layers, "vocab": len(tok)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--chars", type=int, default=600, help="characters per document")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="int8,fp32")
    ap.add_argument("--work", type=Path, default=Path("/tmp/embedpool-rerank-qwen3-bench"))
    args = ap.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    queries = QUERIES[: args.queries]
    docs = [c[: args.chars] for c in stdlib_chunks(args.docs)]
    pairs = [[q, d] for q in queries for d in docs]
    pairs_path = work / "pairs.json"
    pairs_path.write_text(json.dumps(pairs))
    model_dir = work / f"qwen3-reranker-0.6b-width-{args.layers}-layers"
    if not (model_dir / "model.safetensors").is_file():
        print(run(DEV_PYTHON, MAKE, str(ROOT), str(model_dir), str(pairs_path), str(args.layers)))
    precisions = args.precisions.split(",")
    for p in precisions:  # graphs built and cached before anything is timed
        subprocess.run(
            [
                PROJECT_PYTHON,
                "-c",
                "import sys; from embedpool.rerank import "
                "Reranker; Reranker(sys.argv[1], precision=sys.argv[2], lazy=True)",
                str(model_dir),
                p,
            ],
            check=True,
        )
    results: dict[str, list[dict[str, Any]]] = {"crossencoder": [], **{p: [] for p in precisions}}
    t = str(args.threads)
    for _ in range(args.rounds):
        results["crossencoder"].append(run(DEV_PYTHON, RUN_CE, str(model_dir), str(pairs_path), t))
        for p in precisions:
            results[p].append(run(PROJECT_PYTHON, RUN_EP, str(model_dir), str(pairs_path), t, p))
    n = len(pairs)
    ce = results["crossencoder"]
    ce_wall = statistics.median(n / r["wall"] for r in ce)
    ce_cpu = statistics.median(n / r["cpu"] for r in ce)
    print(
        f"{n} pairs ({len(queries)} queries x {len(docs)} stdlib chunks of {args.chars} "
        f"chars), {args.layers} layers, {args.rounds} rounds, {args.threads} threads, "
        f"medians; CPU: {cpu_name()}"
    )
    print(f"{'system':28} {'pairs/s':>9} {'pairs/CPU-s':>12} {'x CE wall':>10} {'x CE CPU':>9}")
    print(f"{'CrossEncoder fp32 (torch)':28} {ce_wall:9.2f} {ce_cpu:12.2f} {1:10.2f} {1:9.2f}")
    reference = ce[0]["scores"]
    for p in precisions:
        rs = results[p]
        wall = statistics.median(n / r["wall"] for r in rs)
        cpu = statistics.median(n / r["cpu"] for r in rs)
        print(
            f"{'embedpool ' + rs[0]['precision']:28} {wall:9.2f} {cpu:12.2f} "
            f"{wall / ce_wall:10.2f} {cpu / ce_cpu:9.2f}"
        )
        scores = rs[0]["scores"]
        if rs[0]["precision"] == "fp32":
            diff = max(abs(a - b) for a, b in zip(scores, reference, strict=True))
            print(f"  fp32 max |score - CrossEncoder| = {diff:.2e}")
        else:
            k = len(docs)
            rho = [
                spearman(scores[i * k : (i + 1) * k], reference[i * k : (i + 1) * k])
                for i in range(len(queries))
            ]
            print(
                f"  {rs[0]['precision']} Spearman per query vs CrossEncoder: "
                f"{', '.join(f'{r:.4f}' for r in rho)}"
            )
        print(f"  pairs truncated: {rs[0]['truncated']}")


if __name__ == "__main__":
    main()
