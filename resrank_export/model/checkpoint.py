"""The ResRank checkpoint: `resrank.json` + `encoder/` + `reranker/` (+ `projector.safetensors`).

Everything that the paper leaves open is a field of `resrank.json`; `load_checkpoint` validates
the whole folder before any stage writes output, so a bad checkpoint never leaves partial files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resrank_export.errors import CheckpointError
from resrank_export.model.text import PASSAGE_MARKER, PASSAGES_MARKER, QUERY_MARKER

CONFIG_FILE = "resrank.json"
PROJECTOR_FILE = "projector.safetensors"
POOLINGS = ("last", "mean", "cls")
# Ceiling of the length and count fields before the backbones' own position limits are read: every
# stage sizes arrays by them (the planner builds a prompt of max_candidates slots), so a typo such
# as 1e12 must fail here, not take the machine's memory.
MAX_LENGTH = 1 << 17  # 131,072: the longest context of the Qwen3 releases (with YaRN)
PROJECTORS = ("none", "linear", "mlp2x_gelu")


@dataclass(frozen=True)
class ResRankConfig:
    """Fields of `resrank.json`; defaults follow the design note."""

    pooling: str = "last"
    normalize: bool = True
    projector: str = "none"
    placeholder_token: str = "<|passage|>"
    prompt_template: str = (
        "Query: {query}\nPassages: {passages}\nRank the passages for the query: {query}"
    )
    residual_alpha: float = 1.0
    max_passage_tokens: int = 512
    max_query_tokens: int = 64
    max_candidates: int = 100
    # Encoder text formats. Qwen3-Embedding: query_template
    # "Instruct: <task>\nQuery:{query}", passages bare, append_eos true (eos_token <|endoftext|>).
    query_template: str = QUERY_MARKER
    passage_template: str = PASSAGE_MARKER
    append_eos: bool = False  # end every encoder text with eos_token (counted in max_passage_tokens)
    eos_token: str = "<|endoftext|>"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: Path) -> "ResRankConfig":
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise CheckpointError(
                f"{source}: unknown field(s) {', '.join(map(repr, unknown))}; expected only {', '.join(known)}"
            )
        values: dict[str, Any] = {}
        for name, value in data.items():
            expected = {"normalize": bool, "residual_alpha": (int, float)}.get(name)
            if expected is None:
                default = known[name].default
                expected = type(default)
            if isinstance(value, bool) and expected is not bool:
                raise CheckpointError(f"{source}: field '{name}' must be a number, got {value!r}")
            if not isinstance(value, expected):
                raise CheckpointError(
                    f"{source}: field '{name}' must be of type "
                    f"{getattr(expected, '__name__', 'number')}, got {value!r}"
                )
            values[name] = value
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: Path) -> None:
        if self.pooling not in POOLINGS:
            raise CheckpointError(
                f"{source}: field 'pooling' is {self.pooling!r}; expected one of {', '.join(POOLINGS)}"
            )
        if self.projector not in PROJECTORS:
            raise CheckpointError(
                f"{source}: field 'projector' is {self.projector!r}; "
                f"expected one of {', '.join(PROJECTORS)}"
            )
        for marker in (QUERY_MARKER, PASSAGES_MARKER):
            if marker not in self.prompt_template:
                raise CheckpointError(
                    f"{source}: field 'prompt_template' has no {marker} marker; "
                    f"expected a template containing {QUERY_MARKER} and {PASSAGES_MARKER}"
                )
        if self.prompt_template.count(PASSAGES_MARKER) != 1:
            raise CheckpointError(
                f"{source}: field 'prompt_template' must contain {PASSAGES_MARKER} exactly once"
            )
        if not self.placeholder_token.strip():
            raise CheckpointError(f"{source}: field 'placeholder_token' must not be empty")
        if self.placeholder_token in self.prompt_template:
            raise CheckpointError(
                f"{source}: field 'prompt_template' contains the placeholder token "
                f"{self.placeholder_token!r}; slots are placed only by {PASSAGES_MARKER}"
            )
        for name, marker in (("query_template", QUERY_MARKER), ("passage_template", PASSAGE_MARKER)):
            if getattr(self, name).count(marker) != 1:
                raise CheckpointError(f"{source}: field '{name}' is {getattr(self, name)!r}; expected a template "
                                      f"containing {marker} exactly once")
        if not self.eos_token.strip():
            raise CheckpointError(f"{source}: field 'eos_token' must not be empty")
        if self.append_eos and self.max_passage_tokens < 2:
            raise CheckpointError(f"{source}: field 'max_passage_tokens' is {self.max_passage_tokens}; with "
                                  "'append_eos' expected at least 2 (the EOS takes one)")
        if not math.isfinite(self.residual_alpha):
            raise CheckpointError(f"{source}: field 'residual_alpha' is {self.residual_alpha}; "
                                  "expected a finite number")
        for name in ("max_passage_tokens", "max_query_tokens", "max_candidates"):
            value = getattr(self, name)
            if not 0 < value <= MAX_LENGTH:
                raise CheckpointError(f"{source}: field '{name}' is {value}; expected an integer > 0 and "
                                      f"<= {MAX_LENGTH:,}")


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint folder."""

    root: Path
    config: ResRankConfig
    encoder_dim: int
    reranker_hidden: int
    placeholder_id: int

    @property
    def encoder_dir(self) -> Path:
        return self.root / "encoder"

    @property
    def reranker_dir(self) -> Path:
        return self.root / "reranker"

    @property
    def projector_path(self) -> Path | None:
        return None if self.config.projector == "none" else self.root / PROJECTOR_FILE


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None


def _backbone_config(model_dir: Path, role: str) -> dict:
    """The backbone's config.json, with a positive integer 'hidden_size'; its weights and tokenizer exist."""
    config_path = model_dir / "config.json"
    config = _read_json(config_path)
    size = config.get("hidden_size") if isinstance(config, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise CheckpointError(f"{config_path}: {role} config has no positive integer 'hidden_size'")
    weights = list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.bin"))
    if not weights:
        raise CheckpointError(
            f"{model_dir}: no {role} weights found; expected model.safetensors (or sharded *.safetensors)"
        )
    if not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{model_dir / 'tokenizer.json'}: file not found; the {role} needs a fast tokenizer file"
        )
    return config


def _check_positions(config_path: Path, backbone: dict, role: str, needed: dict[str, int]) -> None:
    """The texts the fields admit fit the backbone's position table (`max_position_embeddings`):
    longer inputs fail inside transformers (absolute positions) or run past what the model saw."""
    positions = backbone.get("max_position_embeddings")
    if not isinstance(positions, int) or isinstance(positions, bool):
        return
    total = sum(needed.values())
    if total > positions:
        fields = " + ".join(f"field '{name}' ({value})" for name, value in needed.items())
        raise CheckpointError(f"{config_path}: {fields} = {total} tokens, more than the {role}'s {positions} "
                              f"positions (max_position_embeddings of {role}/config.json)")


def safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", ...} from one safetensors header (no weights are read)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        return {name: {"dtype": info["dtype"], "shape": list(info["shape"])}
                for name, info in header.items() if name != "__metadata__"}
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:  # truncated, not safetensors
        raise CheckpointError(f"{path.parent}: cannot be loaded ({path.name}: no readable safetensors header, "
                              f"{type(exc).__name__})") from None


def safetensors_headers(model_dir: Path) -> dict[str, dict]:
    """`safetensors_header` of every *.safetensors file of a (sharded) Hugging Face model folder."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors file (the weights' shapes and dtype are read from it)")
    return {name: info for path in files for name, info in safetensors_header(path).items()}


_SAFETENSORS_FLOATS = {"F32": ("fp32", 4), "F16": ("fp16", 2), "BF16": ("bf16", 2), "F64": ("fp32", 8)}


def stored_dtype(model_dir: Path) -> str:
    """"fp32", "fp16" or "bf16": the float type holding most of a model folder's weight bytes (the
    Qwen3 releases store BF16; `build --export-dtype auto` exports a half target from half weights).
    A folder with only pytorch_model.bin says "fp32": its dtype is unknown without unpickling it."""
    if not any(Path(model_dir).glob("*.safetensors")):
        return "fp32"
    totals: dict[str, int] = {}
    for info in safetensors_headers(model_dir).values():
        if info["dtype"] in _SAFETENSORS_FLOATS:
            name, size = _SAFETENSORS_FLOATS[info["dtype"]]
            totals[name] = totals.get(name, 0) + math.prod(info["shape"]) * size
    return max(totals, key=totals.get) if totals else "fp32"


def parameter_count(model_dir: Path) -> int:
    """Weight elements of a model folder, from its safetensors headers (no weights are read); a
    folder with only pytorch_model.bin is counted at 4 bytes an element."""
    if any(Path(model_dir).glob("*.safetensors")):
        return sum(math.prod(info["shape"]) for info in safetensors_headers(model_dir).values())
    return sum(path.stat().st_size for path in Path(model_dir).glob("*.bin")) // 4


SAMPLE_BUDGET_PARAMETERS = 50_000_000


def scaled_sample_size(count: int, checkpoint: "Checkpoint", floor: int) -> int:
    """A default sample size tuned on the demo (a 23M-parameter encoder), kept up to 50M encoder
    parameters and divided by the parameter ratio beyond: every sampled text costs about 2 x
    parameters FLOPs a token through the FP32 reference or graph, so a 0.6B build's default checks
    cost what the demo's did, not 12 times as much. Never below `floor`, never above `count`."""
    parameters = max(parameter_count(checkpoint.encoder_dir), SAMPLE_BUDGET_PARAMETERS)
    return min(count, max(floor, math.ceil(count * SAMPLE_BUDGET_PARAMETERS / parameters)))


def _placeholder_id(reranker_dir: Path, token: str) -> int:
    from tokenizers import Tokenizer

    path = reranker_dir / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise CheckpointError(f"{path}: cannot be read as a tokenizer ({exc})") from None
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise CheckpointError(
            f"{path}: placeholder token {token!r} (field 'placeholder_token' of {CONFIG_FILE}) "
            "is not in the reranker tokenizer; add it as a special token"
        )
    ids = tokenizer.encode(f"a {token} b", add_special_tokens=False).ids
    if ids.count(token_id) != 1:
        raise CheckpointError(
            f"{path}: placeholder token {token!r} does not encode to one token inside text; "
            "add it as a special (non-normalized) added token"
        )
    return token_id


def _check_eos_token(encoder_dir: Path, token: str) -> None:
    from tokenizers import Tokenizer

    path = encoder_dir / "tokenizer.json"
    try:
        found = Tokenizer.from_file(str(path)).token_to_id(token)
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise CheckpointError(f"{path}: cannot be read as a tokenizer ({exc})") from None
    if found is None:
        raise CheckpointError(f"{path}: eos token {token!r} (field 'eos_token' of {CONFIG_FILE}, appended because "
                              "'append_eos' is true) is not in the encoder tokenizer")


def _check_projector(path: Path, kind: str, in_dim: int, out_dim: int) -> None:
    """Every tensor of the projector weights has the shape `build_projector(kind, in_dim,
    out_dim)` loads, so a wrong file fails here and not inside the export."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; projector '{kind}' needs its weights")
    expected = {
        "linear": {"weight": [out_dim, in_dim], "bias": [out_dim]},
        "mlp2x_gelu": {"0.weight": [out_dim, in_dim], "0.bias": [out_dim],
                       "2.weight": [out_dim, out_dim], "2.bias": [out_dim]},
    }[kind]
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({exc})") from None
    if sorted(shapes) != sorted(expected):
        raise CheckpointError(
            f"{path}: projector '{kind}' expects tensors {sorted(expected)}, found {sorted(shapes)}"
        )
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise CheckpointError(
                f"{path}: projector '{kind}' tensor '{name}' has shape {shapes[name]}; expected {shape} "
                f"(encoder dim {in_dim}, reranker hidden size {out_dim})"
            )


def load_checkpoint(root: str | Path) -> Checkpoint:
    """Validate a checkpoint folder and return its description; raises CheckpointError."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint folder not found")
    config_path = root / CONFIG_FILE
    config = ResRankConfig.from_json(_read_json(config_path), config_path)
    for role in ("encoder", "reranker"):
        if not (root / role).is_dir():
            raise CheckpointError(f"{root / role}: folder not found; a checkpoint needs {role}/")
    encoder, reranker = _backbone_config(root / "encoder", "encoder"), _backbone_config(root / "reranker", "reranker")
    encoder_dim, reranker_hidden = encoder["hidden_size"], reranker["hidden_size"]
    for name in ("max_passage_tokens", "max_query_tokens"):  # the encoder encodes passages and queries
        _check_positions(config_path, encoder, "encoder", {name: getattr(config, name)})
    # Each candidate takes one slot token of the reranker's prompt, beside the query's tokens.
    _check_positions(config_path, reranker, "reranker", {"max_candidates": config.max_candidates,
                                                         "max_query_tokens": config.max_query_tokens})
    if config.projector == "none":
        if encoder_dim != reranker_hidden:
            raise CheckpointError(
                f"{config_path}: field 'projector' is 'none' but the encoder dim ({encoder_dim}) "
                f"differs from the reranker hidden size ({reranker_hidden}); "
                "use projector 'linear' or 'mlp2x_gelu'"
            )
    else:
        _check_projector(root / PROJECTOR_FILE, config.projector, encoder_dim, reranker_hidden)
    if config.append_eos:
        _check_eos_token(root / "encoder", config.eos_token)
    placeholder_id = _placeholder_id(root / "reranker", config.placeholder_token)
    return Checkpoint(root, config, encoder_dim, reranker_hidden, placeholder_id)
