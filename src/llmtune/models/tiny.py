"""A tiny Llama with a BPE tokenizer trained in code, saved with save_pretrained so the real loading path runs."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer learns its merges from: the shipped demo data plus the words prompts use."""
    from llmtune.data.loading import resource_path

    lines = Path(resource_path("sentiment_demo.csv")).read_text(encoding="utf-8").splitlines()
    return lines + ["positive negative neutral answer question context sentiment label"] * 50


def build_tiny_model(out_dir: Path, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                     num_attention_heads: int, num_key_value_heads: int, vocab_size: int, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer, build a randomly initialised Llama around it and save both to out_dir."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    # Prepend <bos> like the real models do, so prompts are encoded the same way for every model.
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", bpe.token_to_id("<bos>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
