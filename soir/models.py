"""Loading causal LMs and tokenizers from local directories, and tiny models built from config.

Never downloads, never runs remote code unless asked. `tiny:ARCH` builds a small model of
one of five architectures (OLMo default; Llama; GPT-2 with Conv1D; GPT-NeoX with fused qkv;
Qwen2 with tied embeddings) for tests and the built-in testbed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from soir.errors import UserError
from soir.settings import setting

TINY_PREFIX = "tiny:"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TinySize:
    """Width and depth of a tiny model; the defaults are the testbed's."""

    hidden: int = setting(128, "width")
    layers: int = setting(2, "transformer blocks")
    heads: int = setting(4, "attention heads")
    intermediate: int = setting(512, "MLP width")
    max_positions: int = setting(256, "longest sequence")


def tiny_config(arch: str, vocab_size: int, size: TinySize = TinySize(), tokenizer=None):
    """A transformers config for a tiny model of `arch` (olmo, llama, gpt2, neox, qwen2)."""
    import transformers as tf

    special = {}
    if tokenizer is not None:
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    common = dict(vocab_size=vocab_size, **special)
    llama_like = dict(
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=size.max_positions,
        **common,
    )
    if arch == "olmo":
        return tf.OlmoConfig(**llama_like, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like, tie_word_embeddings=True)
    if arch == "gpt2":
        return tf.GPT2Config(
            n_embd=size.hidden, n_layer=size.layers, n_head=size.heads, n_inner=size.intermediate,
            n_positions=size.max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    if arch == "neox":
        return tf.GPTNeoXConfig(
            hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
            num_attention_heads=size.heads, max_position_embeddings=size.max_positions,
            tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0, **common,
        )
    raise UserError(f"unknown tiny architecture {arch!r}: use one of {', '.join(TINY_ARCHS)}")


TINY_ARCHS = ("olmo", "llama", "gpt2", "neox", "qwen2")


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"unknown --dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """Load a tokenizer from a local directory; give it a pad token if it has none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"tokenizer directory not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UserError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str | os.PathLike,
    tokenizer=None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    eager_attention: bool = False,
    trust_remote_code: bool = False,
    size: TinySize = TinySize(),
    seed: int = 0,
):
    """Load a causal LM from a local `save_pretrained` directory, or build `tiny:ARCH` from config.

    Eager attention is needed for second-order work (SDPA kernels lack double backward).
    A tokenizer, when given, must fit the model's vocabulary.
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(dtype)
    attention = "eager" if eager_attention else None
    spec = str(spec)
    if spec.startswith(TINY_PREFIX):
        check_model_spec(spec, tokenizer)
        config = tiny_config(spec[len(TINY_PREFIX):], len(tokenizer), size, tokenizer)
        if attention:
            config._attn_implementation = attention
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    else:
        path = check_model_dir(spec)
        kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code, "use_safetensors": None}
        if attention:
            kwargs["attn_implementation"] = attention
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", **kwargs)
        except Exception as exc:
            raise UserError(f"cannot load a model from {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if tokenizer is not None:
        check_vocab_fits(model, tokenizer)
    if device is not None:
        model.to(device)
    return model


@dataclass(frozen=True)
class ModelSettings:
    """Which model to load and how; shared by every stage that loads one.

    `model` is a `save_pretrained` directory or `tiny:ARCH` (built from config with `size`, and
    then `tokenizer` is required); `tokenizer` defaults to the model's directory.
    """

    model: str = setting(help="a save_pretrained directory, or tiny:olmo|tiny:llama|tiny:gpt2|tiny:neox|tiny:qwen2 to build a small model from config", metavar="DIR|tiny:ARCH")
    tokenizer: str | None = setting(None, "tokenizer directory (default: the model's; required for tiny:*)", metavar="DIR")
    dtype: str | None = setting(None, "parameter dtype; unset: the checkpoint's (float32 for tiny:*)", choices=DTYPES)
    device: str | None = setting(None, "torch device, e.g. cpu or cuda (default: cpu)")
    size: TinySize = field(default_factory=TinySize)
    trust_remote_code: bool = False

    @property
    def tokenizer_dir(self) -> str:
        return str(self.tokenizer or self.model)

    def check(self) -> None:
        """UserError when the model cannot be loaded as given (before anything is read or written)."""
        check_model_spec(self.model, self.tokenizer)

    def load_tokenizer(self):
        self.check()
        return load_tokenizer(self.tokenizer_dir, trust_remote_code=self.trust_remote_code)

    def load(self, tokenizer=None, *, eager_attention: bool = False, seed: int = 0):
        """The model, checked against `tokenizer` when one is given."""
        return load_model(self.model, tokenizer, dtype=self.dtype, device=self.device, eager_attention=eager_attention,
                          trust_remote_code=self.trust_remote_code, size=self.size, seed=seed)


def check_model_spec(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> None:
    """UserError unless `model` is a model directory, or `tiny:ARCH` with a tokenizer directory."""
    spec = str(model)
    if spec.startswith(TINY_PREFIX):
        if tokenizer is None:
            raise UserError(f"--model {spec} builds a model from config and needs --tokenizer DIR for its vocabulary")
        if spec[len(TINY_PREFIX):] not in TINY_ARCHS:
            raise UserError(f"unknown tiny architecture {spec[len(TINY_PREFIX):]!r}: use one of {', '.join(TINY_ARCHS)}")
    else:
        check_model_dir(spec)


def check_model_dir(spec: str | os.PathLike) -> Path:
    """The path of a local model directory, or a UserError saying what is wrong with it."""
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"model directory not found: {path} (give a save_pretrained directory or tiny:{'|tiny:'.join(TINY_ARCHS)})")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model directory: it has no config.json")
    return path


def check_vocab_fits(model, tokenizer) -> None:
    """Every token id the tokenizer can produce must index the model's embedding table."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: "
            "use the tokenizer the model was trained with (--tokenizer DIR)"
        )


def save_model(model, tokenizer, out: str | os.PathLike, state_dict: dict | None = None) -> None:
    """`save_pretrained` model (safetensors; `state_dict` in place of its own) and tokenizer into `out`."""
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
