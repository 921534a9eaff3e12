"""Reference PyTorch ResRank: the modules that are exported to ONNX, and a small pipeline
(`ResRankReference`) that encodes and ranks with them. The exported graphs are checked
against this reference."""

from __future__ import annotations

import functools
import gc
import inspect
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from resrank_export.errors import CheckpointError
from resrank_export.model.checkpoint import Checkpoint, stored_dtype
from resrank_export.model.text import PassageTokenizer, PromptBuilder
from resrank_export.progress import track
from resrank_export.runtime import length_batches


TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_backbone(model_dir, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Any Hugging Face model that takes inputs_embeds + attention_mask and returns
    last_hidden_state, its weights in `dtype` (loaded tensor by tensor: a BF16 checkpoint read as
    BF16 never exists in FP32). Eager attention: it exports to plain ONNX ops that every runtime
    and ModelOpt handle, and it is what the parity reference runs too."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    except Exception as exc:  # corrupt weights, unknown model_type, ...: a user error, one line
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{model_dir}: cannot be loaded as a Hugging Face model "
                              f"({type(exc).__name__}: {reason})") from None
    return model.eval()


def compute_in_fp32(module: nn.Module) -> nn.Module:
    """Run a half-weight module's arithmetic in FP32 without keeping an FP32 copy of its weights:
    each leaf module's parameters are upcast for its own call only (an embedding table is looked
    up in half and its rows upcast, which is exact). The activations stay FP32 end to end, so the
    result is the checkpoint's own function, against which a half graph's rounding is measured.
    Written here because PyTorch's autocast only lowers precision; and on a CPU without AVX-512
    PyTorch's FP16/BF16 matmuls are far slower than its FP32 ones (a 0.6B FP16 parity reference
    ran for over 30 minutes)."""

    def upcast_inputs(leaf, args, kwargs):
        widen = (lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
        leaf._half_parameters = dict(leaf._parameters)
        for name, param in leaf._half_parameters.items():
            if param is not None:
                leaf._parameters[name] = param.float()
        return tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()}

    def restore(leaf, args, kwargs, output):
        leaf._parameters.update(leaf.__dict__.pop("_half_parameters"))

    def upcast_rows(leaf, args, output):
        return output.float()

    for leaf in module.modules():
        if not any(p.is_floating_point() and p.dtype != torch.float32 for p in leaf.parameters(recurse=False)):
            continue
        if isinstance(leaf, nn.Embedding):
            leaf.register_forward_hook(upcast_rows)
        else:
            leaf.register_forward_pre_hook(upcast_inputs, with_kwargs=True)
            leaf.register_forward_hook(restore, with_kwargs=True)
    return module


def _backbone_kwargs(backbone: nn.Module) -> dict:
    # Decoder backbones would build a KV cache that a one-pass ranker never reads.
    return {"use_cache": False} if "use_cache" in inspect.signature(backbone.forward).parameters else {}


def _gather_rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, H], positions [B, k] -> [B, k, H]."""
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)


def _last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1] index of the last real token, whatever the padding side (the model card of
    Qwen3-Embedding pads on the left, our tokenizers on the right): the largest masked position."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)
    return (positions * (attention_mask > 0)).amax(dim=1, keepdim=True)


class EncoderOnnxWrapper(nn.Module):
    """input_ids, attention_mask -> one pooled (optionally L2-normalised) FP32 vector per text;
    pooling and the L2 norm run in FP32 whatever the backbone's dtype."""

    def __init__(self, backbone: nn.Module, pooling: str, normalize: bool):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, **_backbone_kwargs(self.backbone)
        ).last_hidden_state.float()
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = _gather_rows(hidden, _last_token_index(attention_mask)).squeeze(1)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {kind!r}")


class RerankerOnnxWrapper(nn.Module):
    """One forward pass: fill the placeholder slots with projected passage vectors, run the
    backbone, score each slot by cos(last-token state, alpha * e_i + h_i). Inputs and scores are
    FP32 and the residual and cosine run in FP32 whatever the backbone's dtype."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, residual_alpha: float):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.residual_alpha = residual_alpha

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        passage_embeddings: torch.Tensor,
        slot_positions: torch.Tensor,
    ) -> torch.Tensor:
        embeds = self.backbone.get_input_embeddings()(input_ids)
        slot_vectors = self.projector(passage_embeddings.to(embeds.dtype)).to(embeds.dtype)
        index = slot_positions.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
        embeds = embeds.scatter(1, index, slot_vectors)
        hidden = self.backbone(
            inputs_embeds=embeds, attention_mask=attention_mask, **_backbone_kwargs(self.backbone)
        ).last_hidden_state.float()
        passages = self.residual_alpha * slot_vectors.float() + _gather_rows(hidden, slot_positions)
        query = _gather_rows(hidden, _last_token_index(attention_mask))
        return nn.functional.cosine_similarity(query, passages, dim=-1)


def load_encoder(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> EncoderOnnxWrapper:
    config = checkpoint.config
    return EncoderOnnxWrapper(load_backbone(checkpoint.encoder_dir, dtype), config.pooling, config.normalize).eval()


def load_reranker(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> RerankerOnnxWrapper:
    config = checkpoint.config
    projector = build_projector(config.projector, checkpoint.encoder_dim, checkpoint.reranker_hidden)
    if checkpoint.projector_path is not None:
        from safetensors.torch import load_file

        projector.load_state_dict(load_file(str(checkpoint.projector_path)))
    backbone = load_backbone(checkpoint.reranker_dir, dtype)
    return RerankerOnnxWrapper(backbone, projector.to(dtype), config.residual_alpha).eval()


def passage_tokenizer(checkpoint: Checkpoint) -> PassageTokenizer:
    return PassageTokenizer.for_config(checkpoint.encoder_dir / "tokenizer.json", checkpoint.config)


def prompt_builder(checkpoint: Checkpoint) -> PromptBuilder:
    config = checkpoint.config
    return PromptBuilder(
        checkpoint.reranker_dir / "tokenizer.json",
        config.prompt_template,
        config.placeholder_token,
        config.max_query_tokens,
        config.max_candidates,
    )


@dataclass(frozen=True)
class Ranking:
    order: np.ndarray  # candidate indices, best first
    scores: np.ndarray  # score of each candidate, in input order


def torch_device(name: str) -> torch.device:
    """`--device cpu|cuda` as a torch device, refused in one line where PyTorch sees no GPU."""
    from resrank_export.errors import NotAvailableError

    if name not in ("cpu", "cuda"):
        raise NotAvailableError(f"--device {name!r}: expected cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise NotAvailableError(f"--device cuda: PyTorch sees no CUDA GPU (torch {torch.__version__}, {build}); "
                                "run on a machine with a GPU and a CUDA build of torch, or use --device cpu")
    return torch.device(name)


class ResRankReference:
    """The whole model in PyTorch: encode texts, score candidates, rank. `dtype` is the dtype of the
    graphs it is compared with: FP16/BF16 weights are held in that dtype, FP32 ones in the dtype
    the checkpoint stores (a BF16 release upcast to FP32 holds exactly the same numbers); either
    way the arithmetic is FP32 (`compute_in_fp32`), so it is the model's own function."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.checkpoint = checkpoint
        self.dtype = dtype  # of the graphs compared with; the arithmetic and the outputs are FP32
        self.device = torch_device(device)
        self.passage_tokenizer = passage_tokenizer(checkpoint)
        self.prompt_builder = prompt_builder(checkpoint)

    def weights_dtype(self, model_dir) -> torch.dtype:
        return self.dtype if self.dtype != torch.float32 else TORCH_DTYPES[stored_dtype(model_dir)]

    # Loaded on first use and freed by `release`: a stage that compares graphs with the reference
    # keeps one model copy alive at a time (at 4B an FP32 copy is 16 GB).
    @functools.cached_property
    def encoder(self) -> EncoderOnnxWrapper:
        encoder = load_encoder(self.checkpoint, self.weights_dtype(self.checkpoint.encoder_dir))
        return compute_in_fp32(encoder.to(self.device))

    @functools.cached_property
    def reranker(self) -> RerankerOnnxWrapper:
        reranker = load_reranker(self.checkpoint, self.weights_dtype(self.checkpoint.reranker_dir))
        return compute_in_fp32(reranker.to(self.device))

    def release(self) -> None:
        """Free the loaded PyTorch modules (they load again if used)."""
        for name in ("encoder", "reranker"):
            self.__dict__.pop(name, None)
        gc.collect()

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Passage vectors [n, De]."""
        return self._encode(self.passage_tokenizer, texts, batch_size)

    def encode_queries(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Query vectors [n, De] (the query template applied)."""
        return self._encode(self.passage_tokenizer.queries, texts, batch_size)

    @torch.inference_mode()
    def _encode(self, tokenize, texts: list[str], batch_size: int) -> np.ndarray:
        """Batches as the graphs get them in `runtime.encode_texts`: by token length, token-bounded."""
        vectors = np.zeros((len(texts), self.checkpoint.encoder_dim), dtype=np.float32)
        if not texts:
            return vectors
        inputs = tokenize(list(texts))
        lengths = inputs["attention_mask"].sum(1)
        for rows in track(length_batches(lengths, batch_size), f"PyTorch reference encoder ({len(texts)} texts)"):
            width = int(lengths[rows].max())
            ids, mask = (torch.from_numpy(inputs[n][rows, :width]).to(self.device)
                         for n in ("input_ids", "attention_mask"))
            vectors[rows] = self.encoder(ids, mask).float().cpu().numpy()
        return vectors

    @torch.inference_mode()
    def score(self, queries: list[str], passage_embeddings: np.ndarray) -> np.ndarray:
        """queries [B], passage_embeddings [B, k, De] -> scores [B, k]."""
        inputs = self.prompt_builder.batch(queries, passage_embeddings.shape[1])
        inputs["passage_embeddings"] = np.ascontiguousarray(passage_embeddings, dtype=np.float32)
        names = ("input_ids", "attention_mask", "passage_embeddings", "slot_positions")
        return self.reranker(*(torch.from_numpy(inputs[n]).to(self.device) for n in names)).cpu().numpy()

    def rank(self, query: str, passages: list[str]) -> Ranking:
        scores = self.score([query], self.encode(passages)[None])[0]
        return Ranking(order=np.argsort(-scores, kind="stable"), scores=scores)
