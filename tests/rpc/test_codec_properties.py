"""Property tests of the codec: any supported value comes back bitwise equal, with its dtype, shape
and (for layouts without gaps) its exact strides, as views over the message."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from lattica_ray.rpc.codec import decode, encode

try:
    import torch
except ImportError:  # torch is optional; its properties skip
    torch = None

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = [
    "|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", ">i2", ">f4", ">c16",
    "<f2", "<f4", "<f8", "<c8", "<c16", "<M8[ns]", "<M8[D]", "<m8[us]", "|S1", "|S5", "<U3",
]  # fmt: skip


def touched_bytes_are_one_block(
    shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int
) -> bool:
    """Brute force: do the bytes under the elements fill [lowest, highest) exactly?"""
    if 0 in shape:
        return True
    offsets = sum(
        (index * stride for index, stride in zip(np.indices(shape), strides, strict=True)),
        start=np.zeros(shape, np.int64),
    ).ravel()
    low = int(offsets.min())
    covered = np.zeros(int(offsets.max()) - low + itemsize, bool)
    for offset in offsets - low:
        covered[offset : offset + itemsize] = True
    return bool(covered.all())


def gap_free(array: np.ndarray) -> bool:
    return touched_bytes_are_one_block(array.shape, array.strides, array.itemsize)


@st.composite
def strided_views(draw: st.DrawFn, dtypes: list[str] = DTYPES) -> np.ndarray:
    """An array of random bytes seen through random transposes, slices, broadcasts and copies."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    shape = draw(array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    size = math.prod(shape) * dtype.itemsize
    raw = draw(st.binary(min_size=size, max_size=size))
    array = np.frombuffer(bytearray(raw), dtype).reshape(shape)
    for _ in range(draw(st.integers(0, 4))):
        operation = draw(st.sampled_from(["transpose", "slice", "broadcast", "fortran", "index"]))
        if operation == "transpose":
            array = array.transpose(draw(st.permutations(range(array.ndim))))
        elif operation == "slice" and array.ndim:
            steps = st.integers(-3, 3).filter(bool)
            array = array[
                tuple(
                    slice(draw(st.integers(0, dim)), None, draw(steps))
                    if draw(st.booleans())
                    else slice(None)
                    for dim in array.shape
                )
            ]
        elif operation == "broadcast" and array.ndim < 6:
            axis = draw(st.integers(0, array.ndim))
            expanded = np.expand_dims(array, axis)
            shape = list(expanded.shape)
            shape[axis] = draw(st.integers(0, 3))
            array = np.broadcast_to(expanded, shape)
        elif operation == "fortran":
            array = np.asfortranarray(array)
        elif operation == "index" and array.ndim and array.shape[0]:
            array = array[draw(st.integers(0, array.shape[0] - 1)), ...]  # a view, even 0-d
    return array


def stride_order_kept(original: np.ndarray, received: np.ndarray) -> bool:
    """Same sign and zero pattern, and an axis with a larger stride still has a larger one."""
    axes = [i for i, dim in enumerate(original.shape) if dim > 1]
    for i in axes:
        if np.sign(original.strides[i]) != np.sign(received.strides[i]):
            return False
        for j in axes:
            if abs(original.strides[i]) < abs(original.strides[j]) and not (
                abs(received.strides[i]) <= abs(received.strides[j])
            ):
                return False
    return True


@SETTINGS
@given(strided_views())
def test_arrays_round_trip_dtype_shape_strides_and_bits(array: np.ndarray) -> None:
    message = bytearray(b"".join(encode(array)))
    out = decode(message)
    assert type(out) is np.ndarray
    assert out.dtype.str == array.dtype.str
    assert out.shape == array.shape
    assert out.tobytes() == array.tobytes()  # bitwise: nan payloads, -0.0, odd bool bytes
    if gap_free(array):
        assert out.strides == array.strides
    else:  # compacted: no foreign bytes were sent, the layout keeps its orientation
        assert gap_free(out)
        assert stride_order_kept(array, out)
    if out.size:
        low, high = np.lib.array_utils.byte_bounds(out)
        start = np.frombuffer(message, np.uint8).ctypes.data
        assert start <= low <= high <= start + len(message)
        assert (low - start) % 64 == 0


def same(a: object, b: object) -> bool:
    """Equality that also tells types apart, compares floats and arrays bitwise, keeps order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, np.ndarray | np.generic):
        return a.dtype.str == b.dtype.str and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return same(list(a), list(b)) and all(same(a[k], b[k]) for k in a)
    return a == b


scalar_values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**200), max_value=10**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary()
)
keys = (
    st.text()
    | st.integers()
    | st.booleans()
    | st.none()
    | st.binary()
    | st.floats(allow_nan=False)
    | st.tuples(st.integers(), st.text())
)
leaves = (
    scalar_values
    | strided_views()
    | strided_views().map(lambda a: a.flat[0] if a.size else np.float32(1))
)
values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=20,
)


@SETTINGS
@given(values)
def test_nested_values_round_trip_exactly(value: object) -> None:
    message = bytearray(b"".join(encode(value)))
    out = decode(message)
    assert same(out, value)
    start = np.frombuffer(message, np.uint8).ctypes.data
    for array in arrays_in(out):  # each block where the writer's layout said it would be
        if array.size:
            assert (np.lib.array_utils.byte_bounds(array)[0] - start) % 64 == 0


def arrays_in(value: object) -> list[np.ndarray]:
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [array for item in value for array in arrays_in(item)]
    return []


TORCH_DTYPES = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2",
]  # fmt: skip


def tensor_bytes(tensor: object) -> bytes:
    if not tensor.numel():
        return b""
    dense = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)  # fresh C strides
    return dense.reshape(-1).view(torch.uint8).numpy().tobytes()


@st.composite
def tensors(draw: st.DrawFn) -> object:
    dtype = getattr(torch, draw(st.sampled_from(TORCH_DTYPES)))
    shape = draw(array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = math.prod(shape) * itemsize
    raw = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if dtype == torch.bool:
        raw = bytearray(byte & 1 for byte in raw)
    tensor = torch.frombuffer(raw, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    tensor = tensor.view(dtype).reshape(shape)
    for _ in range(draw(st.integers(0, 3))):
        operation = draw(st.sampled_from(["permute", "slice", "expand"]))
        if operation == "permute":
            tensor = tensor.permute(tuple(draw(st.permutations(range(tensor.dim())))))
        elif operation == "slice" and tensor.dim():
            axis = draw(st.integers(0, tensor.dim() - 1))
            start = draw(st.integers(0, tensor.shape[axis]))
            index = [slice(None)] * tensor.dim()
            index[axis] = slice(start, None, draw(st.integers(1, 3)))
            tensor = tensor[tuple(index)]
        elif operation == "expand" and tensor.dim() < 6:
            axis = draw(st.integers(0, tensor.dim()))
            shape = list(tensor.unsqueeze(axis).shape)
            shape[axis] = draw(st.integers(0, 3))
            tensor = tensor.unsqueeze(axis).expand(*shape)
    return tensor


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@SETTINGS
@given(tensors())
def test_torch_tensors_round_trip_dtype_shape_strides_and_bits(tensor: object) -> None:
    message = bytearray(b"".join(encode(tensor)))
    out = decode(message)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert tensor_bytes(out) == tensor_bytes(tensor)
    itemsize = tensor.element_size()
    byte_strides = tuple(stride * itemsize for stride in tensor.stride())
    if touched_bytes_are_one_block(tuple(tensor.shape), byte_strides, itemsize):
        assert out.stride() == tensor.stride()
    if out.numel():
        start = np.frombuffer(message, np.uint8).ctypes.data
        assert start <= out.data_ptr() < start + len(message)
