"""A real byte-level BPE tokenizer trained on a few sentences with the ``tokenizers`` library, saved the
way a Hugging Face checkpoint ships one (tokenizer.json + tokenizer_config.json), for text end-to-end tests."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# OPT's special tokens and ids: <s> 0, <pad> 1, </s> 2 (also OPT's bos), <unk> 3.
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is the end of the story.",
    "a small café in Zürich serves crème brûlée",
    "numbers: 1 2 3 4 5 and more words to merge",
]


def save_tiny_tokenizer(directory: Path, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Train the tokenizer (at most ``vocab_size`` ids) and save it into ``directory``; returns it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    # Like OPT's tokenizer, every prompt starts with </s>.
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    return fast
