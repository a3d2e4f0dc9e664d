"""The NeuronScope pruning guide's own Python code, run as written on the embedded default model.

The guide lives beside the repository in ``../shared/seed/``. Its Python blocks run in order in one namespace,
each in a fresh temporary directory, with two replacements only: the imports (``src.backend...`` becomes
``neuronscope_tl``) and the model name (``'gpt2'`` becomes the embedded default). The README shows the same code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import neuronscope_tl as ns

pytestmark = pytest.mark.default_model
ROOT = Path(__file__).resolve().parents[1]
SEED_DIR = ROOT.parent / "shared" / "seed"
README = ROOT / "README.md"


def seed_blocks() -> list:
    files = sorted(SEED_DIR.glob("*.txt")) if SEED_DIR.is_dir() else []
    if not files:
        if os.environ.get("CI"):
            pytest.fail(f"the pruning guide is missing: no *.txt in {SEED_DIR}")
        pytest.skip(f"the pruning guide is not beside this checkout ({SEED_DIR})")
    return re.findall(r"```python\n(.*?)```", files[0].read_text(encoding="utf-8"), re.S)


def adapt(code: str) -> str:
    """The two replacements: import path and model name."""
    code = re.sub(r"^from src\.backend(\.\w+)* import ", "from neuronscope_tl import ", code, flags=re.M)
    return code.replace("'gpt2'", f"'{ns.DEFAULT_MODEL_NAME}'")


def test_guide_runs_verbatim(tmp_path, monkeypatch, capsys):
    blocks = [adapt(b) for b in seed_blocks()]
    assert len(blocks) == 6 and "MultiModelLoader" in blocks[0]
    namespace: dict = {}
    outputs, snapshots = [], []
    for i, code in enumerate(blocks):
        workdir = tmp_path / f"block{i}"
        workdir.mkdir()
        monkeypatch.chdir(workdir)
        exec(compile(code, f"guide block {i}", "exec"), namespace)
        outputs.append(capsys.readouterr().out)
        snapshots.append(dict(namespace))  # later blocks rebind names such as ``impact``

    usage, initial, identify, assess, batch, export = outputs
    # Python Backend Usage: sparsity, candidates, one impact with its verdict line
    assert re.search(r"^Overall sparsity: 0\.\d{3}$", usage, re.M)
    n_found = int(re.search(r"^Found (\d+) pruning candidates$", usage, re.M).group(1))
    assert n_found == len(namespace["candidates"]) > 0
    impact = snapshots[0]["impact"]
    assert f"Impact score: {impact.impact_score:.3f}" in usage and f"Safe to prune: {impact.impact_score < 0.1}" in usage
    # 1. parameters, with thousands separators
    assert f"Model has {namespace['sparsity_analysis']['total_parameters']:,} parameters" in initial
    assert namespace["sparsity_analysis"]["total_parameters"] == 134_515_008
    # 2. at least one safe candidate, and not every candidate
    n_safe = int(re.search(r"Identified (\d+) safe pruning candidates", identify).group(1))
    safe = namespace["safe_candidates"]
    assert n_safe == len(safe) and 0 < n_safe < len(namespace["candidates"])
    # 3. the first five safe candidates are simulated, one line each
    lines = re.findall(r"^Neuron (\d+): impact=(\d+\.\d{3})$", assess, re.M)
    assert [int(n) for n, _ in lines] == [c.neuron_index for c in safe[:5]]
    # 4. the recommendations cover every candidate of the batch
    rec = namespace["batch_results"]["recommendations"]
    covered = [(d["layer_index"], d["neuron_index"]) for key in ("safe_to_prune", "moderate", "risky_to_prune") for d in rec[key]]
    assert sorted(covered) == sorted((c["layer_index"], c["neuron_index"]) for c in namespace["batch_candidates"])
    assert len(namespace["batch_candidates"]) == min(10, n_safe)
    assert "Safe to prune: [" in batch and "Risky to prune: [" in batch
    # 5. the export parses
    doc = json.loads((tmp_path / "block5" / "pruning_analysis.json").read_text())
    assert doc["kind"] == "weight_analysis" and doc["result"]["total_parameters"] == 134_515_008


def test_readme_shows_the_guide_code():
    """The README's Python usage is the guide's first block, adapted; it is executed by the test above."""
    block = README.read_text().split("## Python usage")[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert code.strip() == adapt(seed_blocks()[0]).strip()
