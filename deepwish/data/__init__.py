"""Data layer: embedded corpus, tokenizers, binary token shards, the packing loader, chat
formatting and the shard builder. See each module's docstring for formats and choices."""
from .build import BuildResult, build_shards, ensure_default_data
from .chat import ChatTemplate, encode_chat, encode_conversation, render_chat, resolve_template
from .corpus import read_corpus, split_documents
from .loader import Batch, Lookahead, PackedLoader, sequential_batches, unigram_entropy
from .shards import ShardError, ShardHeader, check_compatible, open_shard, read_header, write_shard
from .tokenizer import Tokenizer, default_tokenizer, load_tokenizer, qwen_tokenizer, resolve_tokenizer, train_bpe

__all__ = [
    "Batch",
    "ChatTemplate",
    "BuildResult",
    "Lookahead",
    "PackedLoader",
    "ShardError",
    "ShardHeader",
    "Tokenizer",
    "build_shards",
    "check_compatible",
    "default_tokenizer",
    "encode_chat",
    "encode_conversation",
    "ensure_default_data",
    "load_tokenizer",
    "open_shard",
    "qwen_tokenizer",
    "read_corpus",
    "read_header",
    "render_chat",
    "resolve_template",
    "resolve_tokenizer",
    "sequential_batches",
    "split_documents",
    "train_bpe",
    "unigram_entropy",
    "write_shard",
]
