"""Array memory layouts for the codec: which dtypes travel, which bytes a strided view covers.

An array travels as one block of bytes (the memory its view spans) plus dtype, shape and strides,
so any layout whose elements tile one contiguous block (C or Fortran order, transposes, reversed
axes, broadcast and sliding-window views) arrives with exactly the strides it left with, as a
zero-copy view over the received block. A view with gaps (`x[::2]`, a column of a row-major
matrix) would otherwise carry the bytes between its elements, which belong to another object and
may be secret; such a view is compacted on send (one copy) into a dense block that keeps its axis
order, reversed axes and broadcast axes, so only the sizes of its strides change.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from lattica_ray.rpc.codec_errors import LimitExceeded, MalformedMessage, UnsupportedType

# numpy dtypes that are plain bytes (no Python objects, no platform-specific padding), written
# as numpy's canonical `dtype.str`. longdouble, structured, object and StringDType are refused.
_DATETIME_UNIT = r"(\[\d*(Y|M|W|D|h|m|s|ms|us|ns|ps|fs|as)\])?"
_NUMPY_DTYPE = re.compile(
    r"\|(b1|i1|u1|S[1-9]\d{0,8})"
    r"|[<>](i2|i4|i8|u2|u4|u8|f2|f4|f8|c8|c16|U[1-9]\d{0,7}|[Mm]8" + _DATETIME_UNIT + r")"
)
logger = logging.getLogger(__name__)

_LITTLE = "<" if sys.byteorder == "little" else ">"

_MAX_INDEX = 2**62  # shapes and strides beyond this cannot describe memory that exists


def numpy_dtype_name(dtype: np.dtype) -> str:
    """The wire name of `dtype`, or UnsupportedType if it cannot travel without pickle."""
    name = dtype.str
    if dtype.fields is not None or _NUMPY_DTYPE.fullmatch(name) is None:
        raise UnsupportedType(
            f"numpy dtype {dtype!r} cannot be sent: only bool, (u)int8-64, float16/32/64, "
            "complex64/128, datetime64/timedelta64 and fixed-size bytes/str (S, U) travel "
            "(object, structured and longdouble dtypes are refused; nothing is pickled)"
        )
    return name


def numpy_dtype(name: object) -> np.dtype:
    """The dtype a received wire name stands for; refuses anything outside the whitelist."""
    if not isinstance(name, str) or _NUMPY_DTYPE.fullmatch(name) is None:
        raise MalformedMessage(f"array dtype {name!r} is not one the codec sends")
    dtype = np.dtype(name)
    if dtype.str != name:  # not canonical: e.g. '<i1' for '|i1'
        raise MalformedMessage(f"array dtype {name!r} is not in canonical form ({dtype.str!r})")
    return dtype


@dataclass(frozen=True, slots=True)
class TorchDtype:
    """How a torch dtype travels: as a numpy array of `storage` (same item size), then viewed."""

    name: str
    storage: np.dtype
    needs_view: bool  # numpy has no such dtype: send a same-size integer view


def _torch_dtypes() -> dict[str, TorchDtype]:
    table: dict[str, TorchDtype] = {}
    native = {
        "bool": "|b1",
        "uint8": "|u1",
        "int8": "|i1",
        "int16": "<i2",
        "int32": "<i4",
        "int64": "<i8",
        "uint16": "<u2",
        "uint32": "<u4",
        "uint64": "<u8",
        "float16": "<f2",
        "float32": "<f4",
        "float64": "<f8",
        "complex64": "<c8",
        "complex128": "<c16",
    }
    viewed = {
        "bfloat16": "<i2",
        "complex32": "<i4",
        "float8_e4m3fn": "|u1",
        "float8_e4m3fnuz": "|u1",
        "float8_e5m2": "|u1",
        "float8_e5m2fnuz": "|u1",
        "float8_e8m0fnu": "|u1",
    }
    for names, needs_view in ((native, False), (viewed, True)):
        for name, storage in names.items():
            table[name] = TorchDtype(name, np.dtype(storage.replace("<", _LITTLE)), needs_view)
    return table


TORCH_DTYPES = _torch_dtypes()


def torch_to_numpy(tensor: Any) -> tuple[str, np.ndarray]:
    """A CPU numpy view of `tensor` (copied to host first if it lives on a GPU) and its dtype name.

    Gradient tracking is dropped (values only); lazy conjugate/negative views are resolved.
    """
    import torch

    name = str(tensor.dtype).removeprefix("torch.")
    spec = TORCH_DTYPES.get(name)
    if spec is None:
        raise UnsupportedType(f"torch dtype {tensor.dtype} cannot be sent by the codec")
    if tensor.layout is not torch.strided or tensor.is_quantized:
        raise UnsupportedType(
            f"only dense (strided) torch tensors can be sent, not {tensor.layout} "
            "or quantized ones; convert with .to_dense() / .dequantize()"
        )
    tensor = tensor.detach()
    if tensor.device.type == "meta":
        raise UnsupportedType("a torch tensor on the 'meta' device has no data to send")
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    if spec.needs_view:
        tensor = tensor.view(getattr(torch, str(spec.storage)))  # e.g. bfloat16 -> int16
    if tensor.numel() == 0:  # .numpy() would zero the strides of an empty tensor
        strides = tuple(stride * tensor.element_size() for stride in tensor.stride())
        return name, np.ndarray(tuple(tensor.shape), spec.storage, buffer=b"", strides=strides)
    return name, tensor.numpy()


@dataclass(frozen=True, slots=True)
class Span:
    """Where a strided view's elements lie, in bytes relative to its first element."""

    low: int  # lowest byte offset touched (<= 0 when some stride is negative)
    high: int  # one past the highest byte touched
    gap_free: bool  # the touched bytes form one contiguous block

    @property
    def size(self) -> int:
        return self.high - self.low


def span(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> Span:
    """The bytes an array of this shape/strides touches, and whether they tile one block.

    Gap-free is decided by growing a covered interval axis by axis in order of stride size: an
    axis keeps it contiguous when its stride is no larger than what is already covered (this is
    exact for the layouts numpy and torch make, and errs on the side of "has gaps" otherwise).
    """
    if 0 in shape:
        return Span(0, 0, True)
    low = high = 0
    steps = []
    for dim, stride in zip(shape, strides, strict=True):
        if dim > 1 and stride != 0:
            reach = stride * (dim - 1)
            if stride < 0:
                low += reach
            else:
                high += reach
            steps.append((abs(stride), dim))
    covered = itemsize
    gap_free = True
    for step, dim in sorted(steps):
        if step > covered:
            gap_free = False
            break
        covered += step * (dim - 1)
    return Span(low, high + itemsize, gap_free)


def compact(array: np.ndarray) -> np.ndarray:
    """A dense copy of a view with gaps, keeping its axis order, reversed and broadcast axes."""
    broadcast = tuple(
        slice(0, 1) if stride == 0 and dim > 1 else slice(None)
        for dim, stride in zip(array.shape, array.strides, strict=True)
    )
    core = array[broadcast]
    reversed_axes = tuple(i for i, stride in enumerate(core.strides) if stride < 0)
    if reversed_axes:
        core = np.flip(core, axis=reversed_axes)
    order = sorted(range(core.ndim), key=lambda axis: -core.strides[axis])
    dense = np.ascontiguousarray(core.transpose(order)).transpose(np.argsort(order))
    if reversed_axes:
        dense = np.flip(dense, axis=reversed_axes)
    if dense.shape != array.shape:
        dense = np.broadcast_to(dense, array.shape)
    return dense


def array_block(array: np.ndarray) -> tuple[np.ndarray, pa.Buffer]:
    """The array as it will travel (compacted if it had gaps) and its block, without a copy."""
    if array.size == 0:
        return array, pa.py_buffer(b"")
    if array.flags.c_contiguous:  # the common case: the block is the array's own buffer
        return array, pa.foreign_buffer(array.ctypes.data, array.nbytes, base=array)
    where = span(array.shape, array.strides, array.itemsize)
    if not where.gap_free:
        array = compact(array)
        where = span(array.shape, array.strides, array.itemsize)
    address = array.ctypes.data + where.low
    return array, pa.foreign_buffer(address, where.size, base=array)


def _int_list(value: object, what: str) -> tuple[int, ...]:
    if type(value) is not list:
        raise MalformedMessage(f"array {what} must be a list of integers, got {value!r:.80}")
    for item in value:
        if type(item) is not int:
            raise MalformedMessage(f"array {what} must be a list of integers, got {value!r:.80}")
        if not -_MAX_INDEX <= item <= _MAX_INDEX:
            raise MalformedMessage(f"array {what} {value!r:.80} is out of range")
    return tuple(value)


def alignment(dtype: np.dtype) -> int:
    """The address alignment an array of `dtype` needs (16 for complex128: torch's kernels)."""
    return min(dtype.itemsize & -dtype.itemsize, 16)


def view_block(
    message: memoryview,
    address: int,
    start: int,
    end: int,
    dtype: np.dtype,
    shape_field: object,
    strides_field: object,
    *,
    max_ndim: int,
    max_elements: int,
) -> np.ndarray:
    """A zero-copy array over `message[start:end]`, after checking that it stays inside it.

    `address` is where `message` lies in memory; a block it leaves misaligned for `dtype` (a
    message received at an odd offset) is copied to aligned memory, strides unchanged.
    """
    shape = _int_list(shape_field, "shape")
    strides = _int_list(strides_field, "strides")
    if len(shape) > max_ndim:
        raise LimitExceeded("array rank", len(shape), max_ndim, "max_ndim")
    if len(strides) != len(shape):
        raise MalformedMessage(f"array has {len(shape)} dimensions but {len(strides)} strides")
    if any(dim < 0 for dim in shape):
        raise MalformedMessage(f"array shape {shape} has a negative dimension")
    elements = 1
    for dim in shape:
        elements *= dim
    if elements > max_elements:
        raise LimitExceeded("array element count", elements, max_elements, "max_array_elements")
    where = span(shape, strides, dtype.itemsize)
    if not where.gap_free:
        raise MalformedMessage(f"array strides {strides} leave gaps; the codec never sends that")
    if where.size != end - start:
        raise MalformedMessage(
            f"array of shape {shape}, strides {strides}, dtype {dtype.str} spans {where.size} "
            f"bytes but its block holds {end - start}"
        )
    need = alignment(dtype)
    if (address + start) % need == 0:
        return np.ndarray(shape, dtype, buffer=message, offset=start - where.low, strides=strides)
    logger.debug("copying a %d-byte block that the message leaves misaligned", end - start)
    spare = np.empty(end - start + need, np.uint8)
    shift = -spare.ctypes.data % need
    block = spare[shift : shift + end - start]
    block[:] = message[start:end]
    return np.ndarray(shape, dtype, buffer=block, offset=-where.low, strides=strides)
