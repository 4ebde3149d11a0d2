"""The tokenizer and chat template a GGUF file carries, built with the ``tokenizers`` library and ``jinja2``.

    tok = Tokenizer.from_gguf(open_gguf(path))
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))   # list[int]
    text = tok.decode(ids, skip_special_tokens=True)

It gives the ids, text and prompts that ``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)`` gives
for the same file: the byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is rebuilt here the way transformers'
GGUF converter builds it (its vocabulary respelling, pre-tokenizer choice from ``tokenizer.ggml.pre``, and added
tokens), and the chat template renders in the sandboxed jinja2 environment transformers uses. Other tokenizer
models (SentencePiece ``llama``, ``t5``, ...) are built through transformers' converter when it is installed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

if TYPE_CHECKING:
    from .gguf_file import GGUFFile

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> the split regex the vocabulary's merges were learned with; the values transformers'
# GGUF converter knows (integrations/gguf/gguf_tokenizer_mapping.py). Any other value (e.g. "smollm", "gpt-2")
# keeps GPT-2's own regex, built into the ByteLevel pre-tokenizer, as there.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}
# Named special tokens: template variable / attribute prefix -> tokenizer.ggml key.
_NAMED = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are spelled."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:  # the rest (whitespace, control bytes) map to 256, 257, ... in byte order
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> _Backend:
    """GPT-2-style BPE over ``tokens`` (ids = positions) and ``merges`` ("a b" strings, best first)."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token holding characters outside the byte alphabet was written as raw text by the converter:
    # respell it in bytes so the BPE can reach it (as transformers does).
    vocab = {tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    try:
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                         continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise ValueError(f"gguf: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {e}") from e
    backend = _Backend(bpe)
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _via_transformers(gguf_file: GGUFFile, model: str) -> _Backend:
    """Tokenizer models other than byte-level BPE, through transformers' GGUF converter when installed."""
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError as e:
        raise ValueError(f"gguf: tokenizer model {model!r} is not supported without transformers "
                         "(only 'gpt2' byte-level BPE is built natively): pip install transformers") from e
    try:
        architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(gguf_file.path))
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ValueError as e:
        raise ValueError(f"gguf: unsupported tokenizer model {model!r}: {e}") from e
    return backend


class Tokenizer:
    """Text <-> token ids, and chat prompts, for one model (what vLLM's ``llm.get_tokenizer()`` gives).

    Attributes: ``vocab_size`` (int); ``bos_token``/``eos_token``/``unk_token``/``pad_token`` (str or None) and
    their ``*_id`` (int or None); ``special_tokens`` (str -> id, every special token, e.g. ``<|im_start|>``);
    ``chat_template`` (str or None); ``backend`` (the ``tokenizers.Tokenizer``).
    """

    def __init__(self, backend: _Backend, *, vocab_size: int, named_ids: dict[str, int | None],
                 chat_template: str | None = None):
        self.backend = backend
        self.vocab_size = vocab_size
        self.chat_template = chat_template
        for name in _NAMED:
            token_id = named_ids.get(name)
            setattr(self, f"{name}_token_id", token_id)
            setattr(self, f"{name}_token", None if token_id is None else backend.id_to_token(token_id))
        self.special_tokens = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.all_special_ids = sorted(self.special_tokens.values())

    @classmethod
    def from_gguf(cls, gguf_file: GGUFFile) -> Tokenizer:
        """Build from the file's ``tokenizer.*`` metadata; ``ValueError("gguf: ...")`` when it is missing or of a
        tokenizer model that cannot be built."""
        model = gguf_file.metadata("tokenizer.ggml.model")
        tokens = gguf_file.metadata("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            missing = [k for k, v in (("tokenizer.ggml.model", model), ("tokenizer.ggml.tokens", tokens)) if v is None]
            raise ValueError(f"gguf: missing tokenizer metadata: {', '.join(missing)}")
        types = gguf_file.metadata("tokenizer.ggml.token_type") or []
        named_ids = {name: gguf_file.metadata(f"tokenizer.ggml.{key}") for name, key in _NAMED.items()}
        if model == "gpt2":
            merges = gguf_file.metadata("tokenizer.ggml.merges")
            if merges is None:
                raise ValueError("gguf: missing tokenizer metadata: tokenizer.ggml.merges")
            backend = _byte_level_bpe(tokens, merges, gguf_file.metadata("tokenizer.ggml.pre"))
            alphabet = set(_bytes_to_unicode().values())
            # Control tokens match whole in the text and are special (skipped by skip_special_tokens). One that
            # is not spelled in the byte alphabet is a llama.cpp mislabel that transformers leaves out; so do we.
            control = [t for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
            # The named ones (bos/eos/...) are special too, as transformers registers them.
            named = [tokens[i] for i in named_ids.values() if i is not None and 0 <= i < len(tokens)]
            special = list(dict.fromkeys(control + [t for t in named if t not in control]))
            backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
            # User-defined tokens (e.g. <think>) match whole but are ordinary text.
            vocab = backend.get_vocab(with_added_tokens=False)
            user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab and t not in special]
            if user:
                backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        else:
            backend = _via_transformers(gguf_file, model)
        template = gguf_file.metadata("tokenizer.chat_template")
        if template is not None:
            try:
                _compile(template)  # at open, not at the first chat
            except Exception as e:  # jinja2's TemplateSyntaxError and friends
                raise ValueError(f"gguf: tokenizer.chat_template does not compile: {type(e).__name__}: {e}") from None
        return cls(backend, vocab_size=len(tokens), named_ids=named_ids, chat_template=template)

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; adds no BOS/EOS, but special-token strings in the text become their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (ints, or a 1-D int tensor/array); invalid UTF-8 byte runs decode to U+FFFD."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """``{"bos_token": ..., "eos_token": ..., ...}`` for the named special tokens the file has."""
        return {f"{name}_token": getattr(self, f"{name}_token") for name in _NAMED
                if getattr(self, f"{name}_token") is not None}

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            chat_template: str | None = None, tokenize: bool = False, **kwargs):
        """The prompt for ``messages`` (dicts with ``role`` and ``content``), rendered from ``chat_template``
        (default: the file's ``tokenizer.chat_template``) as transformers' ``apply_chat_template(...,
        tokenize=False)`` renders it; with ``tokenize=True``, its token ids. Extra ``kwargs`` are template
        variables."""
        chat_template = chat_template or self.chat_template
        if chat_template is None:
            raise ValueError("gguf: the file has no tokenizer.chat_template, and none was given")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        # As transformers: keys whose value is None are dropped (templates handle a missing key, not "None").
        chat = [{k: v for k, v in m.items() if v is not None} for m in _plain(list(messages))]
        variables = {**self.special_tokens_map, **_plain(kwargs)}
        text = _compile(chat_template).render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                     add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text) if tokenize else text


def _plain(value):
    """A copy of ``value`` made of JSON types only: the sandboxed template never sees callers' objects (their
    methods), as in transformers."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy strings) carry extra methods
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"  # anything else becomes an inert placeholder


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled in transformers' environment: an immutable sandbox, trim_blocks and lstrip_blocks,
    loop controls, and the globals and filters Hub templates rely on."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        # dict() for templates without exposing the type itself to attribute access
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespace() that refuses underscore attributes (a way into CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r} on a namespace")

    class Generation(jinja2.ext.Extension):
        # {% generation %} ... {% endgeneration %} marks assistant text for training masks: render it as is.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env.from_string(source)
