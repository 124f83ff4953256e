"""Tiny random transformers models and a character tokenizer for the model-level tests."""
from __future__ import annotations

import string

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = 1000

# Tiny models gain nothing from threads, and on shared cores each parallel region can stall for
# milliseconds waiting for a descheduled thread.
torch.set_num_threads(1)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        vocab_size=VOCAB, max_position_embeddings=4096, sliding_window=None,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=4096,
    ),
    "qwen3": lambda: transformers.Qwen3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=VOCAB, max_position_embeddings=4096,
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, vocab_size=VOCAB, max_position_embeddings=4096, sliding_window=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
    ),
}
CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
    "gemma3": transformers.Gemma3ForCausalLM,
}


def tiny_model(kind: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A randomly initialised model of family ``kind`` (hidden 64, 2-4 layers, vocab 1000)."""
    config = CONFIGS[kind]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = CLASSES[kind](config).to(dtype).eval()
    # Random weights give near-uniform attention; larger q/k weights make scores discriminative.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(4.0)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


def char_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """Character-level tokenizer (ids < 120), optionally with a ChatML-style template."""
    chars = string.printable
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "<|user|>": 4, "<|assistant|>": 5}
    vocab.update({c: i + 6 for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.add_special_tokens(list(vocab)[:6])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat:
        fast.chat_template = (
            "<bos>{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    return fast


def random_text(n: int, seed: int = 0) -> str:
    """``n`` pseudo-random lowercase characters and spaces."""
    g = torch.Generator().manual_seed(seed)
    letters = string.ascii_lowercase + "    "
    return "".join(letters[i] for i in torch.randint(len(letters), (n,), generator=g).tolist())
