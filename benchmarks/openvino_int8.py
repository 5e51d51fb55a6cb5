"""int8 candidates for the OpenVINO engine against embedpool's quality bar (dev only; needs
nncf, which embedpool never imports at run time)::

    pip install nncf            # into a scratch environment beside embedpool[openvino]
    .venv/bin/python benchmarks/openvino_int8.py --calibration 200 --held-out 200

The default model's fused fp32 graph is saved as OpenVINO IR first (NNCF 3.4's graph
builder fails on the model OpenVINO's ONNX frontend returns: "Could not find a node
Gather_... in NNCFGraph"; OpenVINO cannot run the unfused BERT graph at batch > 1). The
candidates, each timed on the held-out chunks (batches of 8, 2 threads) and compared with
OpenVINO fp32 on them (cos mean / min; embedpool's bar: >= 0.997 / >= 0.99):

* ``static-transformer``: ``nncf.quantize(model_type=TRANSFORMER)`` (SmoothQuant on),
  calibrated on the first N chunks of the built-in corpus, one text per sample;
* ``static-transformer-no-sq``: the same with SmoothQuant off;
* ``weight-int8``: ``nncf.compress_weights(INT8_ASYM)`` (weights only, fp32 compute);
* ``weight-int8-dynamic``: that, with the CPU plugin's dynamic activation quantisation
  (``DYNAMIC_QUANTIZATION_GROUP_SIZE=32``, effective where the CPU has VNNI/AMX).

Held-out texts are corpus chunks 2,000 onwards, never in the calibration set.

What shipped: ``weight-int8``'s recipe written into embedpool's own ONNX graph
(``embedpool.graph.weight_int8``: uint8 weights with zero points behind DequantizeLinear,
which OpenVINO's frontend keeps compressed), no NNCF; ``benchmarks/engines.py`` measures it
(``ov-int8``) against OpenVINO fp32 and ONNX Runtime int8 in one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def main() -> int:
    import nncf
    import openvino as ov

    from embedpool.corpus import stdlib_chunks
    from embedpool.graph import prepare_onnx
    from embedpool.models import resolve_model
    from embedpool.tokenization import TextTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", type=int, default=200)
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated candidate names")
    args = ap.parse_args()

    model = resolve_model()
    tok = TextTokenizer.for_model(model)
    chunks = [c.text for c in stdlib_chunks(2000 + args.held_out)]

    def batches(texts: list[str], size: int) -> list[dict[str, Any]]:
        seqs = sorted(tok.encode(texts).sequences, key=len)
        out = []
        for i in range(0, len(seqs), size):
            b = seqs[i : i + size]
            ids = np.zeros((len(b), max(len(s) for s in b)), np.int64)
            mask = np.zeros_like(ids)
            for r, s in enumerate(b):
                ids[r, : len(s)] = s
                mask[r, : len(s)] = 1
            out.append({"input_ids": ids, "attention_mask": mask})
        return out

    held = batches(chunks[2000:], 8)
    calibration = batches(chunks[: args.calibration], 1)
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32"}
    with tempfile.TemporaryDirectory(prefix="embedpool-ov-int8-") as tmp:
        ir = str(Path(tmp) / "fp32.xml")
        ov.save_model(core.read_model(str(prepare_onnx(model, "fp32"))), ir, compress_to_fp16=False)

        def run(m: Any, extra: dict[str, Any] | None = None) -> tuple[np.ndarray, float]:
            compiled = core.compile_model(m, "CPU", {**config, **(extra or {})})
            t0 = time.perf_counter()
            v = np.concatenate([compiled(b)[compiled.outputs[0]] for b in held])
            return v, time.perf_counter() - t0

        ref, t_ref = run(core.read_model(ir))
        n = len(ref)
        print(f"OpenVINO fp32: {n / t_ref:.2f} chunks/s on {n} held-out chunks")
        candidates: dict[str, tuple[Any, dict[str, Any] | None]] = {
            "static-transformer": (
                lambda: nncf.quantize(
                    core.read_model(ir),
                    nncf.Dataset(calibration),
                    subset_size=args.calibration,
                    model_type=nncf.ModelType.TRANSFORMER,
                ),
                None,
            ),
            "static-transformer-no-sq": (
                lambda: nncf.quantize(
                    core.read_model(ir),
                    nncf.Dataset(calibration),
                    subset_size=args.calibration,
                    model_type=nncf.ModelType.TRANSFORMER,
                    advanced_parameters=nncf.AdvancedQuantizationParameters(
                        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1)
                    ),
                ),
                None,
            ),
            "weight-int8": (
                lambda: nncf.compress_weights(
                    core.read_model(ir), mode=nncf.CompressWeightsMode.INT8_ASYM
                ),
                None,
            ),
            "weight-int8-dynamic": (
                lambda: nncf.compress_weights(
                    core.read_model(ir), mode=nncf.CompressWeightsMode.INT8_ASYM
                ),
                {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 32},
            ),
        }
        wanted = set(args.only.split(",")) if args.only else set(candidates)
        for name, (make, extra) in candidates.items():
            if name not in wanted:
                continue
            t0 = time.perf_counter()
            quantised = make()
            built = time.perf_counter() - t0
            v, dt = run(quantised, extra)
            cos = (v * ref).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(ref, axis=1)
            ok = cos.mean() >= 0.997 and cos.min() >= 0.99
            print(
                f"{name}: built in {built:.1f} s, {n / dt:.2f} chunks/s ({t_ref / dt:.2f}x "
                f"fp32), cos mean {cos.mean():.5f} min {cos.min():.5f}"
                f" ({'meets' if ok else 'misses'} the bar)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
