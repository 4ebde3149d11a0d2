"""The array libraries of the functional API: torch tensors and numpy arrays, one job: knowing both.

**The library follows the inputs.** A call whose arrays are all numpy runs on numpy end to end (scratch, outputs,
results; nothing here imports torch for it), so an edge device with TVM's runtime, numpy and ``ml_dtypes`` alone
runs exported kernels. A call with any torch tensor runs on torch: its numpy arrays are viewed as torch tensors
(zero copy, so index arrays from :class:`~tvm_paged.PageAllocator` go with torch caches as they are), and results
are torch tensors.

torch is optional: imported here if installed (``sys.modules["torch"] = None`` makes it absent). numpy spells
bfloat16 and the 8-bit floats with ``ml_dtypes`` (a dependency of apache-tvm).

A numpy array's device is :data:`CPU` (a :class:`HostDevice`); a torch tensor's is its ``torch.device``. The
device an array is allocated "on" picks its library: :data:`CPU` allocates numpy, a ``torch.device`` torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

try:
    import torch
except ImportError:  # an edge device: TVM's runtime and numpy only
    torch = None

try:
    import ml_dtypes
except ImportError:  # numpy without bfloat16 / float8: arrays of those dtypes cannot exist either
    ml_dtypes = None


class _NoTorch:
    """Stands for ``torch.Tensor`` without torch: nothing is an instance."""


# ``isinstance(x, Tensor)``: whether ``x`` is a torch tensor, torch installed or not.
Tensor = torch.Tensor if torch is not None else _NoTorch

# dtype name -> numpy dtype: q and out (float32/float16/bfloat16), 8-bit caches, index arrays, cache bytes.
NUMPY_DTYPES = {name: np.dtype(name) for name in ("float32", "float16", "int32", "int64", "uint8")}
if ml_dtypes is not None:
    NUMPY_DTYPES.update({name: np.dtype(getattr(ml_dtypes, name))
                         for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")})
# The same names for torch dtypes (empty without torch).
TORCH_DTYPES = {} if torch is None else {
    name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                                            "int32", "int64", "uint8")}
# dtype -> name, one table per library (looked up by the array's library: no cross-library comparisons).
_NUMPY_NAMES = {dt: name for name, dt in NUMPY_DTYPES.items()}
_TORCH_NAMES = {dt: name for name, dt in TORCH_DTYPES.items()}
# q's dtypes and the 8-bit cache dtypes, by torch dtype (the cache's and the serving engine's vocabulary).
TORCH_DTYPE_NAMES = {dt: n for dt, n in _TORCH_NAMES.items() if n in ("float32", "float16", "bfloat16")}
TORCH_FP8_NAMES = {dt: n for dt, n in _TORCH_NAMES.items() if n.startswith("float8")}
# The 8-bit float dtypes of both libraries (a numpy dtype compared with a torch one is just unequal).
_FP8 = frozenset(dt for table in (NUMPY_DTYPES, TORCH_DTYPES) for n, dt in table.items() if n.startswith("float8"))


@dataclass(frozen=True)
class HostDevice:
    """Where numpy arrays live: the host CPU. Has ``type`` like a ``torch.device``, so device checks, kernel
    providers and targets take either."""

    type: str = "cpu"
    index: None = None

    def __str__(self) -> str:
        return "cpu"


CPU = HostDevice()


# ------------------------------------------------------------------------------------------ which library
def is_torch(x) -> bool:
    return isinstance(x, Tensor)


def is_array(x) -> bool:
    """A torch tensor or a numpy array."""
    return isinstance(x, np.ndarray) or is_torch(x)


def uses_torch(*xs) -> bool:
    """Whether a call with these arguments runs on torch: any of them is a torch tensor. (Pass the likeliest
    torch tensor first: the serving loop's call is decided by one check.)"""
    for x in xs:
        if isinstance(x, Tensor):
            return True
    return False


def on_torch(device) -> bool:
    """Whether arrays on ``device`` are torch tensors (anything but :data:`CPU`, numpy's host)."""
    return not isinstance(device, HostDevice)


def as_array(x, name: str, torch_call: bool):
    """``x`` as an array of the call's library: torch (``torch_call``) or numpy. A numpy array in a torch call
    becomes a torch view of it (zero copy; ml_dtypes' bfloat16 and float8 by their bits); anything else that is
    not an array of that library is refused with a ValueError naming ``name``."""
    if torch_call:
        if isinstance(x, Tensor):
            return x
        if isinstance(x, np.ndarray):
            return _torch_view(x, name)
        raise ValueError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if isinstance(x, np.ndarray):
        return x
    if is_torch(x):
        raise ValueError(f"{name}: a torch tensor in a call on numpy arrays (pass numpy, or torch throughout)")
    raise ValueError(f"{name}: expected a numpy.ndarray{' or torch.Tensor' if torch else ''}, got "
                     f"{type(x).__name__}")


def _torch_view(x: np.ndarray, name: str):
    """A torch tensor over a numpy array's memory (torch cannot take ml_dtypes' dtypes: their bits, viewed)."""
    bits = _ML_BITS.get(_NUMPY_NAMES.get(x.dtype))
    try:
        with warnings.catch_warnings():  # a read-only array: check_writable refuses it where it is written
            warnings.simplefilter("ignore", UserWarning)
            if bits is not None:
                return torch.from_numpy(x.view(bits)).view(TORCH_DTYPES[x.dtype.name])
            return torch.from_numpy(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: unsupported array ({exc})") from None


# ml_dtypes' dtypes, by name -> the unsigned integer of their size.
_ML_BITS = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8}


# ------------------------------------------------------------------------------------------ properties
def dtype_name(x) -> str | None:
    """The project's name of ``x``'s dtype (``float32``, ``bfloat16``, ``float8_e4m3fn``, ``int32``, ...), None
    for any other (float64, a big-endian float32, ...)."""
    return (_NUMPY_NAMES if isinstance(x, np.ndarray) else _TORCH_NAMES).get(x.dtype)


def is_fp8(x) -> bool:
    """An 8-bit float dtype (float8_e4m3fn, float8_e5m2), torch's or ml_dtypes'."""
    return x.dtype in _FP8


def device(x):
    """:data:`CPU` for a numpy array, a torch tensor's ``device``."""
    return CPU if isinstance(x, np.ndarray) else x.device


def same_device(a, b) -> bool:
    """Whether two devices are one (numpy's host and torch's CPU are the same memory)."""
    return a == b or (a.type == "cpu" and b.type == "cpu")


def numel(x) -> int:
    return int(x.size) if isinstance(x, np.ndarray) else x.numel()


def is_contiguous(x) -> bool:
    """Row-major contiguous (C order)."""
    return bool(x.flags.c_contiguous) if isinstance(x, np.ndarray) else x.is_contiguous()


def is_writable(x) -> bool:
    """False for a read-only numpy array (a view of a file, a broadcast, ``flags.writeable = False``)."""
    return not isinstance(x, np.ndarray) or bool(x.flags.writeable)


def byte_span(x) -> tuple[int, int] | None:
    """The byte range [first, last + 1) the elements of ``x`` occupy, None when it has none."""
    if isinstance(x, np.ndarray):
        if x.size == 0:
            return None
        start, unit, strides = x.__array_interface__["data"][0], 1, x.strides  # numpy strides are in bytes
    else:
        if x.numel() == 0:
            return None
        start, unit, strides = x.data_ptr(), x.element_size(), x.stride()  # torch's in elements
    lo = hi = 0
    for size, stride in zip(x.shape, strides):
        reach = (size - 1) * stride
        if reach < 0:
            lo += reach
        else:
            hi += reach
    return start + lo * unit, start + hi * unit + x.itemsize


def all_finite(x, positive: bool = False) -> bool:
    """Every value finite (and > 0 with ``positive``)."""
    if isinstance(x, np.ndarray):
        ok = np.isfinite(x)
        return bool((ok & (x > 0)).all() if positive else ok.all())
    ok = torch.isfinite(x)
    return bool((ok & (x > 0)).all() if positive else ok.all())


# ------------------------------------------------------------------------------------------ conversions
def contiguous(x):
    """``x`` itself when row-major contiguous, else a contiguous copy."""
    if isinstance(x, np.ndarray):
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)
    return x.contiguous()


def private(x, *sources):
    """``x``, or a copy of it when it shares memory with one of ``sources`` (arrays the caller keeps and may
    change after a check)."""
    span = byte_span(x)
    if span is None:
        return x
    for src in sources:
        other = byte_span(src) if is_array(src) else None
        if other is not None and span[0] < other[1] and other[0] < span[1]:
            return x.copy() if isinstance(x, np.ndarray) else x.clone()
    return x


def byte_view(cache):
    """An 8-bit cache ``[num_pages, page_size, num_kv_heads, head_dim]`` as its bytes (``uint8``, zero copy):
    how the kernels take it."""
    return cache.view(np.uint8) if isinstance(cache, np.ndarray) else cache.view(torch.uint8)


def cast(x, dtype: str):
    """``x`` in dtype ``dtype`` (a name of :data:`NUMPY_DTYPES`), itself when it already is (``int64`` ->
    ``int32`` narrows: callers check the values fit)."""
    if isinstance(x, np.ndarray):
        return x.astype(NUMPY_DTYPES[dtype], copy=False)
    return x.to(TORCH_DTYPES[dtype])


def host_numpy(x) -> np.ndarray:
    """A numpy array of ``x``'s values on the host (``x`` itself for numpy; a copy from a GPU): for index
    arrays (block_table, seq_lens, slot_mapping) the checks read."""
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


def to_device(x, device):
    """``x`` on ``device``, in that device's library (zero copy between numpy and torch on the CPU)."""
    if isinstance(device, HostDevice):
        return x if isinstance(x, np.ndarray) else x.cpu().numpy()
    if isinstance(x, np.ndarray):
        x = _torch_view(x, "array")
    return x if x.device == device else x.to(device)


def indices_on(x, device, dtype: str):
    """An index array (slot_mapping, src_pages, ...) as a kernel takes it: contiguous, in dtype ``dtype``
    (``int32`` / ``int64``), on ``device`` and in its library."""
    if isinstance(device, HostDevice):
        return np.ascontiguousarray(host_numpy(x), dtype=NUMPY_DTYPES[dtype])
    if isinstance(x, np.ndarray):
        x = _torch_view(x, "array")
    return x.to(device=device, dtype=TORCH_DTYPES[dtype]).contiguous()


def as_device(spec, like):
    """The device a plan's runs use: ``spec`` (None: ``like``'s, the device of its tables; ``"cpu"``: the host,
    in ``like``'s library; else a ``torch.device`` or its name, which needs torch)."""
    if spec is None:
        return device(like)
    if isinstance(spec, HostDevice):
        return spec
    if spec == "cpu" and isinstance(like, np.ndarray):
        return CPU
    if torch is None:
        raise ValueError(f"device: {spec!r} needs torch (numpy arrays live on the host: device=None or 'cpu')")
    try:
        return torch.device(spec)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"device: {spec!r} is not a device ({exc})") from None


# ------------------------------------------------------------------------------------------ allocation
def empty(shape, dtype: str, device):
    """An uninitialized array (scratch, an output) of ``shape`` and dtype name ``dtype`` on ``device``: numpy on
    :data:`CPU`, torch on a ``torch.device``."""
    if isinstance(device, HostDevice):
        return np.empty(shape, dtype=NUMPY_DTYPES[dtype])
    return torch.empty(shape, dtype=TORCH_DTYPES[dtype], device=device)


def empty_like(x):
    """An uninitialized contiguous array of ``x``'s shape, dtype, library and device."""
    if isinstance(x, np.ndarray):
        return np.empty(x.shape, dtype=x.dtype)
    return torch.empty_like(x)


def full(shape, value: float, dtype: str, device):
    """An array of ``shape`` filled with ``value`` (per-head scales broadcast from one number)."""
    if isinstance(device, HostDevice):
        return np.full(shape, value, dtype=NUMPY_DTYPES[dtype])
    return torch.full(shape, value, dtype=TORCH_DTYPES[dtype], device=device)


def index_table(rows: list, width: int, device):
    """A ``[len(rows), width]`` int32 array of ``rows`` (tuples of ints) on ``device``, compact even when empty
    (an empty torch tensor made from numpy would get zero strides, which TVM rejects)."""
    if isinstance(device, HostDevice):
        return np.array(rows, dtype=np.int32).reshape(len(rows), width)
    t = torch.tensor(rows, dtype=torch.int32) if rows else torch.zeros((0, width), dtype=torch.int32)
    return t.to(device)
