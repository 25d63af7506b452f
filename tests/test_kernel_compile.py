"""Every fused CUDA kernel (minimlp.fast.cuda_kernels) compiles for sm_90 with NVRTC, on a machine with no GPU.

CuPy writes a kernel's CUDA source at its first launch, from the arguments it is given: their dtypes, their
number of dimensions after CuPy merges contiguous axes, contiguity, broadcasting, and whether 32-bit offsets
reach every element. A launch needs a GPU, so this file does what the launch would do, without one:

  1. One training step (minimlp.step.train_step) of a small ResMLP on the CPU, with drop path off and on,
     records each call of an operation that the GPU's fast path offers (cuda_kernels.OPERATIONS), with the
     very arrays the model passes: views of the flat parameter buffer, broadcast biases, reshapes. These
     layouts are the GPU model's at any size (S12 at batch 256 included). The same steps under
     --amp-dtype bfloat16 record every matrix product's operands, which cuda_kernels.to_bfloat16 rounds
     for cuBLAS on the GPU.
  2. Each recorded call runs cuda_kernels' function with NumPy arrays standing in for CuPy's and CuPy's kernel
     classes replaced by recorders: that lists every kernel launch, its kernel and its arguments.
  3. For each launch, CuPy's own code generator (cupy._core internals: CuPy is pinned in
     requirements-test.txt) writes the source from the arguments as CuPy describes them (ported below: its
     broadcasting and axis merging), and NVRTC compiles it with CuPy's options, for sm_90 (H100, H200).
Sizes only matter through the offset width: every array of S12 at batch 256 is under 2 GiB (32-bit
offsets); each kernel is compiled a second time as if its arrays were larger (64-bit offsets).

Needs CuPy, NVRTC and the CUDA runtime headers (requirements-test.txt: cupy-cuda12x, nvidia-cuda-nvrtc-cu12,
nvidia-cuda-runtime-cu12), no GPU and no driver. Under CI (CI set) their absence fails instead of skipping.
On a GPU, test_generated_sources_are_the_ones_cupy_compiles checks step 3 against CuPy itself.
"""
import dataclasses
import functools
import inspect
import math
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest


def _import_cupy_with_nvrtc():
    try:
        import cupy
        from cupy.cuda import nvrtc
        nvrtc.getVersion()  # loads libnvrtc
        return cupy
    except Exception as error:  # not installed, or its NVRTC library not found
        reason = (f"compiling the CUDA kernels needs CuPy, NVRTC and the CUDA headers "
                  f"(python3 -m pip install -r requirements-test.txt): {type(error).__name__}: {error}")
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


cupy = _import_cupy_with_nvrtc()
from cupy import _util as cupy_util  # noqa: E402
from cupy._core import _carray, _kernel, _reduction, _scalar, internal  # noqa: E402
from cupy._core import core as cupy_core  # noqa: E402
from cupy.cuda import compiler  # noqa: E402

from minimlp import backend, create_model, layers, precision  # noqa: E402
from minimlp.fast import cuda_kernels
from minimlp.precision import policy  # noqa: E402
from minimlp.optim import AdamW  # noqa: E402
from minimlp.step import train_step  # noqa: E402
from tests.conftest import GPU_SKIP_REASON  # noqa: E402

ARCH = "90"  # sm_90: H100 and H200
OFFSETS_32_BIT_LIMIT = 1 << 31  # bytes: CuPy gives an array 32-bit offsets up to this size
DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]
TYPE_NAMES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}  # C++ names, in template arguments
SMALL_RESMLP = dict(img_size=32, patch_size=8, dim=24, depth=2, num_classes=10)  # 16 patches, hidden 96
BATCH = 4
# CuPy's _ArgKind (cupy/_core/_kernel.pxd)
ARG_KIND_NDARRAY, ARG_KIND_INDEXER, ARG_KIND_SCALAR = 1, 2, 3


# ---------------------------------------------------------------------------------------------
# Arguments as CuPy's code generator sees them
# ---------------------------------------------------------------------------------------------
def c_contiguity(shape, strides, itemsize):
    return bool(internal.get_c_contiguity(list(shape), list(strides), itemsize))


@dataclasses.dataclass(frozen=True)
class Array:
    """What the code generator reads from an array argument."""
    shape: tuple
    strides: tuple
    dtype: np.dtype
    c_contiguous: bool
    offsets_32_bit: bool  # CuPy's _index_32_bits: the array's memory spans at most 2 GiB

    @classmethod
    def of(cls, array, wide=False):
        """A NumPy array standing in for a CuPy one, or a CuPy array. wide: as if it spanned over 2 GiB."""
        if isinstance(array, np.ndarray):  # a CuPy view keeps its base allocation's flag, as NumPy keeps .base
            owner = array
            while isinstance(owner.base, np.ndarray):
                owner = owner.base
            contiguous = c_contiguity(array.shape, array.strides, array.itemsize)
            narrow = owner.nbytes <= OFFSETS_32_BIT_LIMIT
        else:
            contiguous, narrow = array._c_contiguous, array._index_32_bits
        return cls(tuple(array.shape), tuple(array.strides), np.dtype(array.dtype), contiguous, narrow and not wide)

    @classmethod
    def new(cls, shape, dtype, wide=False):
        """A fresh C-contiguous allocation, as CuPy makes for an output it is not given."""
        dtype, shape = np.dtype(dtype), tuple(shape)
        strides = tuple(int(np.prod(shape[axis + 1:])) * dtype.itemsize for axis in range(len(shape)))
        return cls(shape, strides, dtype, True, math.prod(shape) * dtype.itemsize <= OFFSETS_32_BIT_LIMIT and not wide)

    def view(self, shape, strides, recompute_contiguity):
        """CuPy's ndarray._view: contiguity recomputed or kept; the offset width is always kept."""
        contiguous = c_contiguity(shape, strides, self.dtype.itemsize) if recompute_contiguity else self.c_contiguous
        return Array(tuple(shape), tuple(strides), self.dtype, contiguous, self.offsets_32_bit)

    def arginfo(self):
        return _kernel._ArgInfo(ARG_KIND_NDARRAY, cupy.ndarray, self.dtype, len(self.shape), self.c_contiguous,
                                self.offsets_32_bit)


@dataclasses.dataclass(frozen=True)
class Scalar:
    dtype: object = None  # None until the kernel's type parameters decide it

    def arginfo(self):
        return _kernel._ArgInfo(ARG_KIND_SCALAR, _scalar.CScalar, np.dtype(self.dtype), 0, True, True)


def indexer_arginfo(shape):
    return _kernel._ArgInfo(ARG_KIND_INDEXER, _carray.Indexer, None, len(shape), True,
                            math.prod(shape) <= OFFSETS_32_BIT_LIMIT)  # elements, not bytes (cupy/_core/_carray.pyx)


def describe(argument, wide):
    """An array argument (a CuPy array, or a NumPy one standing in for it) or a scalar (Python or NumPy)."""
    return Array.of(argument, wide) if isinstance(argument, (np.ndarray, cupy.ndarray)) else Scalar()


def broadcast(operands):
    """CuPy's _broadcast_core (cupy/_core/internal.pyx): the common shape, and each array not already of that
    shape as a view of it, stride 0 along the broadcast axes, its contiguity recomputed."""
    arrays = [o for o in operands if isinstance(o, Array)]
    ndim = max(len(a.shape) for a in arrays)
    shape = []
    for axis in range(ndim):
        size = 1
        for a in arrays:
            if axis >= ndim - len(a.shape) and a.shape[axis - ndim + len(a.shape)] not in (1, size):
                if size != 1:
                    raise ValueError(f"shapes {[a.shape for a in arrays]} do not broadcast")
                size = a.shape[axis - ndim + len(a.shape)]
        shape.append(size)
    shape, views = tuple(shape), []
    for o in operands:
        if not isinstance(o, Array) or o.shape == shape:
            views.append(o)
            continue
        strides, lead = [0] * ndim, ndim - len(o.shape)
        for axis, size in enumerate(o.shape):
            if size == shape[axis + lead]:
                strides[axis + lead] = o.strides[axis]
        views.append(o.view(shape, strides, recompute_contiguity=True))
    return shape, views


def reduce_dims(operands, shape):
    """CuPy's _reduce_dims (cupy/_core/_kernel.pyx): merge the axes along which every array is contiguous.
    Returns (shape, operands) with the arrays as views of the merged shape (contiguity flags kept)."""
    ndim, operands = len(shape), list(operands)
    arrays = [i for i, o in enumerate(operands) if isinstance(o, Array)]
    if ndim <= 1 or not operands or not arrays:
        return shape, operands
    if len(operands) == 1:  # ndarray.reduced_view
        (a,) = operands
        if a.c_contiguous:
            total = math.prod(a.shape)
            return (total,), [a.view((total,), (a.dtype.itemsize,), recompute_contiguity=False)]
        reduced_shape, reduced_strides = [], []
        for size, stride in zip(a.shape, a.strides):  # internal.get_reduced_dims
            if size == 0:
                reduced_shape, reduced_strides = [0], [a.dtype.itemsize]
                break
            if size == 1:
                continue
            if reduced_shape and reduced_strides[-1] == size * stride:
                reduced_shape[-1] *= size
                reduced_strides[-1] = stride
            else:
                reduced_shape.append(size)
                reduced_strides.append(stride)
        if len(reduced_shape) == ndim:
            return shape, operands
        return tuple(reduced_shape), [a.view(reduced_shape, reduced_strides, recompute_contiguity=False)]
    strided = [i for i in arrays if not operands[i].c_contiguous]
    if not strided:  # all contiguous: one flat axis
        total = math.prod(operands[arrays[0]].shape)
        for i in arrays:
            operands[i] = operands[i].view((total,), (operands[i].dtype.itemsize,), recompute_contiguity=False)
        return (total,), operands
    if ndim == 2:
        return shape, operands
    merged, kept, last = list(shape), [], -1
    for axis in range(ndim):
        if merged[axis] == 1:
            continue
        if last < 0:
            last = axis
            continue
        if all(operands[i].strides[axis] * merged[axis] == operands[i].strides[last] for i in strided):
            merged[axis] *= merged[last]
        else:
            kept.append(last)
        last = axis
    if last >= 0:
        kept.append(last)
    if len(kept) == ndim:
        return shape, operands
    new_shape = tuple(merged[axis] for axis in kept)
    for i in arrays:
        operands[i] = operands[i].view(new_shape, [operands[i].strides[axis] for axis in kept],
                                       recompute_contiguity=False)
    return new_shape, operands


# ---------------------------------------------------------------------------------------------
# A launch's source, as CuPy writes it (cupy/_core/_kernel.pyx, _reduction.pyx, raw.pyx)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    kernel: object  # the cupy.ElementwiseKernel, cupy.ReductionKernel or cupy.RawModule
    function: str  # the kernel's name; for a RawModule, the name expression of the function launched
    args: tuple
    kwargs: dict

    def compile_call(self, wide=False):
        """(source, options, name_expressions): what CuPy passes to core.compile_with_cache at this launch."""
        if isinstance(self.kernel, cupy.RawModule):
            return self.kernel.code, self.kernel.options, self.kernel.name_expressions
        if isinstance(self.kernel, cupy.ReductionKernel):
            return reduction_source(self.kernel, self.args, self.kwargs, wide), self.kernel.options, None
        source = elementwise_source(self.kernel, self.args, self.kwargs, wide)
        return source, self.kernel.kwargs.get("options", ()), None

    def prepared(self, wide=False):
        """(full source, NVRTC options, name expressions) as CuPy hands them to NVRTC."""
        source, options, name_expressions = self.compile_call(wide)
        if isinstance(self.kernel, cupy.RawModule):  # RawModule: no CuPy headers prepended (raw.pyx)
            return cupy_compiler_input(source, options, prepend_cupy_headers=False, name_expressions=name_expressions)
        return cupy_compiler_input(source, options)


def elementwise_source(kernel, args, kwargs, wide):
    """ElementwiseKernel.__call__ up to the code: broadcast, decide T, allocate outputs, merge axes."""
    if kwargs or len(args) not in (kernel.nin, kernel.nargs) or any(p.raw for p in kernel.params):
        raise NotImplementedError(f"{kernel.name}: size=, raw parameters or missing arguments are not modelled")
    operands = [describe(a, wide) for a in args]
    shape, views = broadcast(operands)  # the outputs take part in the broadcast, but keep their own layout
    inputs, outputs = views[:kernel.nin], operands[kernel.nin:]
    in_types, out_types, type_map = kernel._decide_params_type(
        tuple(o.dtype if isinstance(o, Array) else None for o in inputs), tuple(o.dtype for o in outputs))
    outputs = outputs or [Array.new(shape, dtype, wide) for dtype in out_types]
    inputs = [o if isinstance(o, Array) else Scalar(dtype) for o, dtype in zip(inputs, in_types)]
    operands = inputs + outputs
    if kernel.reduce_dims:
        shape, operands = reduce_dims(operands, shape)
    arginfos = tuple(o.arginfo() for o in operands) + (indexer_arginfo(shape),)
    return _kernel._get_elementwise_kernel_code(arginfos, type_map, kernel.params, kernel.operation, kernel.name,
                                                kernel.preamble, **kernel.kwargs)


def reduction_source(kernel, args, kwargs, wide):
    """ReductionKernel.__call__ and _AbstractReductionKernel._call up to the code, for the simple (non-CUB) path."""
    kwargs = dict(kwargs)
    axis, keepdims = kwargs.pop("axis", None), kwargs.pop("keepdims", False)
    if kwargs or len(args) != kernel.nin or any(p.raw for p in kernel._params[:kernel.nin + kernel.nout]):
        raise NotImplementedError(f"{kernel.name}: out=, stream= or raw parameters are not modelled")
    if kernel.nin == 1:  # a single input may take CUB's path (_cub_reduction.pyx), which is not modelled here
        raise NotImplementedError(f"{kernel.name}: one-input ReductionKernel")
    shape, inputs = broadcast([describe(a, wide) for a in args])
    in_types, out_types, type_map = _kernel._decide_params_type(
        kernel.in_params, kernel.out_params, tuple(o.dtype.type if isinstance(o, Array) else None for o in inputs), ())
    reduce_axis, out_axis = _reduction._get_axis(axis, len(shape))
    out_shape = tuple(_reduction._get_out_shape(list(shape), reduce_axis, out_axis, keepdims))
    outputs = [Array.new(out_shape, dtype, wide) for dtype in out_types]
    index_type = "int64" if math.prod(shape) / max(math.prod(out_shape), 1) > 0x7fffffff else "int32"
    type_map = _kernel._TypeMap(type_map._pairs + (("IndexT", index_type),))
    inputs = [o if isinstance(o, Array) else Scalar(dtype) for o, dtype in zip(inputs, in_types)]
    permutation = reduce_axis + out_axis  # the reduced axes first (_set_permuted_args)
    if permutation != tuple(range(len(shape))):
        shape = tuple(shape[axis] for axis in permutation)
        inputs = [o.view(shape, [o.strides[axis] for axis in permutation], recompute_contiguity=True)
                  if isinstance(o, Array) else o for o in inputs]
    if kernel.reduce_dims:
        shape, inputs = reduce_dims(inputs, shape)
        out_shape, outputs = reduce_dims(outputs, out_shape)
    block_size = _reduction._get_block_specs(math.prod(shape), math.prod(out_shape), 1, -1)[0]
    arginfos = (tuple(o.arginfo() for o in inputs + outputs)
                + (indexer_arginfo(shape), indexer_arginfo(out_shape), Scalar(np.int32).arginfo()))
    return _reduction._ReductionKernel_get_cached_function_code(
        kernel.nin, kernel.nout, kernel._params, arginfos, type_map, kernel.name, block_size, kernel.reduce_type,
        kernel.identity, kernel.map_expr, kernel.reduce_expr, kernel.post_map_expr, kernel.preamble, kernel.options)


class _Captured(Exception):
    pass


def cupy_compiler_input(source, options, **compile_options):
    """What core.compile_with_cache hands the compiler for `source`: CuPy's headers prepended (unless told not
    to), its include paths (CuPy's, CCCL's, the CUDA runtime wheel's headers) and C++ standard added.
    Returns (full source, NVRTC options, name_expressions)."""
    captured = []

    def capture(full_source, full_options=(), **kwargs):
        captured.append((full_source, full_options, kwargs.get("name_expressions")))
        raise _Captured

    original, compiler._compile_module_with_cache = compiler._compile_module_with_cache, capture
    try:
        cupy_core.compile_with_cache(source, tuple(options), **compile_options)
    except _Captured:
        pass
    finally:
        compiler._compile_module_with_cache = original
    (prepared,) = captured
    return prepared


def nvrtc_compile(full_source, options, name_expressions=None, arch=ARCH):
    """NVRTC, as CuPy runs it at a first launch (compiler._compile_with_cache_cuda), for sm_<arch>: the cubin.
    Raises compiler.CompileException with NVRTC's log."""
    options = tuple(options) + ("-ftz=true", f"-arch=sm_{arch}", "--device-as-default-execution-space")
    program = compiler._NVRTCProgram(full_source, "kern.cu", name_expressions=name_expressions, method="cubin")
    cubin, _ = program.compile(options)
    return cubin


# ---------------------------------------------------------------------------------------------
# Recording what minimlp launches
# ---------------------------------------------------------------------------------------------
def kernel_builders():
    """cuda_kernels' kernel factories: the functools-cached functions that build each CuPy kernel on first use."""
    return [value for value in vars(cuda_kernels).values()
            if callable(getattr(value, "cache_clear", None)) and not inspect.signature(value).parameters]


def stand_in_output(args):
    """What a kernel that does not run returns: a NumPy array of zeros of the broadcast shape of its array
    arguments, so that code after the launch (a sum of the result, say) runs as it would."""
    arrays = [arg for arg in args if isinstance(arg, np.ndarray)]
    return np.zeros(np.broadcast_shapes(*(array.shape for array in arrays)), arrays[0].dtype)


def recording_kernel_classes(launches, launch_for_real):
    """Subclasses of CuPy's kernel classes that append a Launch per call and, if launch_for_real, launch."""
    class ElementwiseKernel(cupy.ElementwiseKernel):
        def __call__(self, *args, **kwargs):
            launches.append(Launch(self, self.name, args, kwargs))
            return super().__call__(*args, **kwargs) if launch_for_real else stand_in_output(args)

    class ReductionKernel(cupy.ReductionKernel):
        def __call__(self, *args, **kwargs):
            launches.append(Launch(self, self.name, args, kwargs))
            return super().__call__(*args, **kwargs) if launch_for_real else None

    class RawModule(cupy.RawModule):
        def get_function(self, name):
            function = super().get_function(name) if launch_for_real else None

            def launch(grid, block, args, **kwargs):
                launches.append(Launch(self, name, args, kwargs))
                return function(grid, block, args, **kwargs) if launch_for_real else None
            return launch

    return dict(ElementwiseKernel=ElementwiseKernel, ReductionKernel=ReductionKernel, RawModule=RawModule)


@pytest.fixture
def recording(monkeypatch):
    """start(launch_for_real) -> the list that every kernel launch of cuda_kernels is appended to. The kernel
    factories' caches are emptied before and after, so no recorder outlives the test."""
    builders = kernel_builders()

    def start(launch_for_real):
        launches = []
        for builder in builders:
            builder.cache_clear()
        for name, cls in recording_kernel_classes(launches, launch_for_real).items():
            monkeypatch.setattr(cupy, name, cls)
        return launches

    yield start
    for builder in builders:
        builder.cache_clear()


def recorded_operation_calls(model):
    """Replace model.ops by the same operations, each appending (name, args, kwargs) to the list returned."""
    calls, operations = [], dict(vars(model.ops))
    for name in cuda_kernels.OPERATIONS:
        def record(*args, _name=name, _reference=operations[name], **kwargs):
            calls.append((_name, args, kwargs))
            return _reference(*args, **kwargs)
        operations[name] = record
    model.ops = SimpleNamespace(**operations)
    return calls


def one_training_step(dtype, drop_path, device="cpu", fast=False, record_operations=False, precision_name="float32"):
    """One train_step of SMALL_RESMLP in that precision; returns the recorded operation calls (record_operations)
    or []."""
    model = create_model("resmlp_s12", device=device, dtype=dtype, fast=fast, drop_path=drop_path, **SMALL_RESMLP)
    calls = recorded_operation_calls(model) if record_operations else []
    optimizer = AdamW(model.parameters, model.ops, lr=1e-3, weight_decay=0.05)  # the recorder's adamw_update
    rng = np.random.default_rng(0)
    images = rng.normal(size=(BATCH, 3, SMALL_RESMLP["img_size"], SMALL_RESMLP["img_size"]))
    train_step(model, optimizer, images, rng.integers(0, SMALL_RESMLP["num_classes"], BATCH), lr=1e-3,
               precision=policy(precision_name), smoothing=0.1)
    return calls


@functools.cache
def operation_calls(dtype):
    """Every call of a cuda_kernels operation in training steps on the CPU, drop path off and on."""
    return [call for drop_path in (0.0, 0.1) for call in one_training_step(dtype, drop_path, record_operations=True)]


@functools.cache
def bfloat16_operands(dtype):
    """Every operand of every matrix product (as the layers hand them to precision.matmul: weight.T views,
    reshapes) in bfloat16 training steps on the CPU, drop path off and on: what to_bfloat16 rounds on the GPU."""
    operands = []

    def recording_matmul(a, b, half_result=False):
        operands.extend((a, b))
        return precision.matmul(a, b, half_result)
    original, layers.matmul = layers.matmul, recording_matmul
    try:
        for drop_path in (0.0, 0.1):
            one_training_step(dtype, drop_path, precision_name="bfloat16")
    finally:
        layers.matmul = original
    return operands


NUMPY_STAND_INS = dict(empty=np.empty, empty_like=np.empty_like, ascontiguousarray=np.ascontiguousarray)


def launches_of(dtype, recording, monkeypatch):
    """The kernel launches of cuda_kernels' functions on the arguments a CPU training step gives them, NumPy
    arrays standing in for CuPy's (empty and never computed: nothing runs)."""
    launches = recording(launch_for_real=False)
    for name, stand_in in NUMPY_STAND_INS.items():
        monkeypatch.setattr(cupy, name, stand_in)
    for name, args, kwargs in operation_calls(dtype):
        getattr(cuda_kernels, name)(*args, **kwargs)
    for operand in bfloat16_operands(dtype):
        cuda_kernels.to_bfloat16(operand)
    return launches


def distinct_compiles(launches, wide):
    """{(function, full source, options, name expressions)} of the launches: each compiled once."""
    distinct = {}
    for launch in launches:
        source, options, names = launch.prepared(wide)
        distinct.setdefault((source, tuple(options), tuple(names or ())), launch.function)
    return distinct


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wide", [False, True], ids=["32-bit-offsets", "64-bit-offsets"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_kernel_compiles_for_sm90(dtype, wide, recording, monkeypatch):
    launches = launches_of(dtype, recording, monkeypatch)
    failures, compiled = [], set()
    for (source, options, names), function in distinct_compiles(launches, wide).items():
        try:
            cubin = nvrtc_compile(source, options, names or None)
        except compiler.CompileException as error:
            failures.append(f"{function}:\n{error.get_message()}")
            continue
        assert cubin[:4] == b"\x7fELF", f"{function}: NVRTC returned no cubin"
        compiled.add(function)
    assert not failures, f"{len(failures)} kernel(s) of minimlp/fast/cuda_kernels.py do not compile for sm_{ARCH}:\n\n" \
        + "\n\n".join(failures)
    assert compiled, "no kernel was launched"


def defined_kernel_functions(recording):
    """The name of every kernel function cuda_kernels' factories build (a RawModule's: its name expressions)."""
    recording(launch_for_real=False)  # fresh factories, and recorders: building compiles nothing
    defined = set()
    for builder in kernel_builders():
        kernel = builder()
        defined |= set(kernel.name_expressions) if isinstance(kernel, cupy.RawModule) else {kernel.name}
    return defined


def test_a_training_step_launches_every_kernel(recording, monkeypatch):
    """Every kernel that cuda_kernels defines is among those compiled above (both dtypes together)."""
    launched = {launch.function for dtype in DTYPES for launch in launches_of(dtype, recording, monkeypatch)}
    defined = defined_kernel_functions(recording)
    assert defined, "no kernel factory found in minimlp/fast/cuda_kernels.py"
    assert defined <= launched, f"defined but never launched by a training step: {sorted(defined - launched)}"
    assert {name for name, _, _ in operation_calls(DTYPES[0])} == set(cuda_kernels.OPERATIONS)


BREAKAGES = {  # function: (text of its source, replaced by a mistake, what NVRTC must say)
    "minimlp_affine": ("y = alpha * x + beta", "y = alpha * x + betta", 'identifier "betta" is undefined'),
    "cross_entropy_rows<float>": ("log(block_reduce", "logg(block_reduce", 'identifier "logg" is undefined'),
    "minimlp_to_bfloat16": ("__float_as_uint(value)", "__float_as_unit(value)",
                            'identifier "__float_as_unit" is undefined'),
}


@pytest.mark.parametrize("function", sorted(BREAKAGES))
def test_a_broken_kernel_fails_to_compile(function, recording, monkeypatch):
    """The check has teeth: one mistake in a kernel's source, and NVRTC refuses it, saying where."""
    launch = next(launch for launch in launches_of(np.dtype(np.float32), recording, monkeypatch)
                  if launch.function == function)
    source, options, names = launch.prepared()
    nvrtc_compile(source, options, names)  # as written, it compiles
    text, mistake, message = BREAKAGES[function]
    assert text in source, f"{function}'s source no longer contains {text!r}: update BREAKAGES"
    with pytest.raises(compiler.CompileException, match="error") as error:
        nvrtc_compile(source.replace(text, mistake), options, names)
    assert message in error.value.get_message()


@pytest.mark.skipif(not backend.gpu_available(), reason=GPU_SKIP_REASON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_generated_sources_are_the_ones_cupy_compiles(dtype, recording, monkeypatch):
    """On a GPU: real training steps with the fused kernels; the source built here for each launch of a
    cuda_kernels kernel (from its CuPy arrays, as above) is the one CuPy itself handed the compiler. This
    checks the port of CuPy's argument handling above against CuPy."""
    defined = defined_kernel_functions(recording)
    handed_to_compiler = set()
    original = compiler._compile_module_with_cache

    def spy(source, *args, **kwargs):
        handed_to_compiler.add(source)
        return original(source, *args, **kwargs)

    cupy_util.clear_memo()  # CuPy keeps compiled kernels per process: cleared, each launch compiles (or loads) again
    monkeypatch.setattr(compiler, "_compile_module_with_cache", spy)
    launches = recording(launch_for_real=True)
    for drop_path in (0.0, 0.1):
        for precision_name in ("float32", "bfloat16"):
            one_training_step(dtype, drop_path, device="gpu", fast=True, precision_name=precision_name)
    cupy.cuda.Device().synchronize()
    ours = [launch for launch in launches if launch.function in defined]
    assert {launch.function for launch in ours} == {name for name in defined if "<" not in name
                                                    or name.endswith(f"<{TYPE_NAMES[dtype]}>")}
    mismatched = sorted({launch.function for launch in ours if launch.prepared()[0] not in handed_to_compiler})
    assert not mismatched, f"the source built here is not the one CuPy compiled, for: {mismatched}"


# ---------------------------------------------------------------------------------------------
# The other half of first contact: `--device gpu` checks at start that CuPy's CUDA libraries load
# (minimlp.backend.check_gpu_libraries), instead of a traceback at the first kernel or matmul.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_check():
    backend.check_gpu_libraries.cache_clear()
    yield backend.check_gpu_libraries
    backend.check_gpu_libraries.cache_clear()


def cublas_loads():
    try:
        from cupy_backends.cuda.libs import cublas  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(cublas_loads(), reason="cuBLAS is installed here: nothing missing to report")
def test_missing_cublas_is_one_line_naming_what_to_install(fresh_check):
    """For real, where cuBLAS is absent (CI installs NVRTC and the headers only): CuPy 14 without [ctk]."""
    with pytest.raises(backend.DeviceError) as error:
        fresh_check()
    message = str(error.value)
    assert "\n" not in message and "cuBLAS" in message and "libcublas" in message
    assert '[ctk]"' in message and "pip install" in message


@pytest.mark.parametrize("check", [what for what, _, _ in backend.GPU_LIBRARY_CHECKS])
def test_each_missing_library_is_one_line(check, fresh_check, monkeypatch):
    """What each check says, with the failure CuPy reports (the issue's messages, as CuPy 14 gives them)."""
    cause = {"NVRTC": ImportError('Failure finding "libnvrtc.so.12": No such file\nsearched: ...'),
             "cuBLAS": ImportError('Failure finding "libcublasLt.so.12": No such file'),
             "a probe kernel": RuntimeError("Failed to find CUDA headers")}[check]

    def fail(cupy):
        raise cause

    checks = [(what, role, fail if what == check else (lambda cupy: None)) for what, role, _ in
              backend.GPU_LIBRARY_CHECKS]
    monkeypatch.setattr(backend, "GPU_LIBRARY_CHECKS", tuple(checks))
    with pytest.raises(backend.DeviceError) as error:
        fresh_check()
    message = str(error.value)
    assert message.startswith("--device gpu: CuPy cannot") and check in message and "\n" not in message
    assert str(cause).splitlines()[0] in message and "[ctk]" in message


def test_nccl_is_checked_only_where_asked(fresh_check, monkeypatch):
    monkeypatch.setattr(backend, "GPU_LIBRARY_CHECKS", tuple((what, role, lambda cupy: None)
                                                             for what, role, _ in backend.GPU_LIBRARY_CHECKS))
    fresh_check()  # one GPU: NCCL is not needed
    with warnings.catch_warnings():  # CuPy warns on importing its NCCL module when the library is missing
        warnings.simplefilter("ignore")
        from cupy.cuda import nccl
    if nccl.available:
        fresh_check(nccl=True)
        return
    with pytest.raises(backend.DeviceError, match=r'several GPUs needs NCCL.*pip install "nvidia-nccl-cu1\d'):
        fresh_check(nccl=True)


def test_resolving_the_gpu_runs_the_check(fresh_check, monkeypatch):
    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    monkeypatch.setattr(backend, "GPU_LIBRARY_CHECKS", (("NVRTC", "for kernels", lambda cupy: 1 / 0),))
    with pytest.raises(backend.DeviceError, match="CuPy cannot load NVRTC"):
        backend.resolve_device("gpu")
    with pytest.raises(backend.DeviceError, match="CuPy cannot load NVRTC"):
        backend.resolve_device("auto")
