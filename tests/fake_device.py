"""A stand-in GPU for the tests: NumPy arrays that behave like CuPy's where a CPU can tell.

On a GPU, CuPy queues the work and returns at once; the host waits for the device only when it
reads something back: float(), int(), bool(), .item(), .tolist(), format() and printing,
cupy.asnumpy, boolean-mask indexing and nonzero / argwhere / unique (their result's size), an
event's or a stream's synchronize(). And CuPy refuses NumPy arrays as operands (TypeError).
This module gives a CPU both properties, so that a test can count a training step's waits, and
catch a host array meeting a device array (say, a cache filled on one backend and read on the
other):

    device = FakeDevice()
    xp = device.xp                # NumPy's functions, on the stand-in device
    a = xp.asarray(host)          # the copy up: not a wait
    float(a.sum())                # a wait: device.syncs == ["float"]
    a + host                      # TypeError, as CuPy raises

`DeviceArray` is an ndarray subclass: NumPy computes, the subclass only watches. Reductions stay
on the device (0-d DeviceArrays, never NumPy scalars), so reading one back counts. Its
xp.cuda.Event / get_elapsed_time / get_current_stream stand in for CuPy's: an event is done once
a wait has come after it (a wait drains the queue), so a clock read without waiting sees what it
would see on a GPU. `device.kernel_module(module)` runs a kernel module (tests/kernel_emu.py's
EmuModule) on device arrays, as device code.

What it cannot see: np.asarray() of a device array in host code (CuPy raises there, so a GPU
run shows it at once).
"""
import itertools
import operator
import threading
import time
import types

import numpy as np

_local = threading.local()   # how deep this thread is in device code (xp calls, kernel launches)
SYNCING_FUNCTIONS = ("nonzero", "argwhere", "flatnonzero", "unique")  # their output size is a wait


class _DeviceCode:
    """NumPy code that may take device arrays (what CuPy itself runs)."""

    def __enter__(self):
        _local.depth = getattr(_local, "depth", 0) + 1

    def __exit__(self, *exc):
        _local.depth -= 1


def _refuse_host_arrays(values):
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, np.ndarray) and not isinstance(item, DeviceArray):
                raise TypeError(f"a NumPy array {item.shape} {item.dtype} met a device array: "
                                "CuPy refuses to mix them (a host array cached, or not copied up?)")


def _to_device(result):
    if isinstance(result, np.ndarray):
        return result if isinstance(result, DeviceArray) else result.view(DeviceArray)
    if isinstance(result, np.generic):
        return np.asarray(result).view(DeviceArray)
    if isinstance(result, (tuple, list)):
        return type(result)(_to_device(r) for r in result)
    return result


def _host(value):
    """Plain ndarray views of device arrays, for NumPy to compute on."""
    if isinstance(value, DeviceArray):
        return value.view(np.ndarray)
    if isinstance(value, (tuple, list)):
        return type(value)(_host(v) for v in value)
    return value


def _is_mask(key):
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, np.ndarray) and k.dtype == np.bool_ and k.ndim > 0 for k in keys)


def _read_back(what, read):
    """A DeviceArray method that reads its value back to the host: a wait, then `read`."""
    def method(self, *args):
        DeviceArray.device.wait(what)
        return read(self.view(np.ndarray), *args)
    return method


class DeviceArray(np.ndarray):
    """An array on the stand-in device (see the module's docstring)."""

    device = None   # the FakeDevice counting the waits

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _refuse_host_arrays(inputs + (out or ()))
        if out is not None:
            kwargs["out"] = _host(out)
        with _DeviceCode():
            result = getattr(ufunc, method)(*_host(inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _to_device(result)

    def __array_function__(self, func, types, args, kwargs):
        if not getattr(_local, "depth", 0):
            raise TypeError(f"numpy.{func.__name__} on a device array: CuPy refuses (use xp)")
        return super().__array_function__(func, types, args, kwargs)

    def __getitem__(self, key):
        if _is_mask(key):
            DeviceArray.device.wait("boolean-mask index")
        return _to_device(super().__getitem__(_host(key)))

    def __setitem__(self, key, value):
        if _is_mask(key):
            DeviceArray.device.wait("boolean-mask assignment")
        _refuse_host_arrays([value])
        super().__setitem__(_host(key), _host(value))

    def __iter__(self):
        for i in range(self.shape[0]):
            yield self[i]

    # reading a value back: each is a wait for the device
    __float__ = _read_back("float", float)
    __int__ = _read_back("int", int)
    __index__ = _read_back("index", operator.index)
    __bool__ = _read_back("bool", bool)
    __complex__ = _read_back("complex", complex)
    item = _read_back("item", np.ndarray.item)
    tolist = _read_back("tolist", np.ndarray.tolist)
    __format__ = _read_back("format", lambda a, spec: format(a.item() if a.ndim == 0 else a, spec))
    __repr__ = __str__ = _read_back("print", lambda a: f"DeviceArray({a!r})")


class _DeviceUfunc:
    """A NumPy ufunc on the device: host arrays refused, results on the device."""

    def __init__(self, ufunc):
        self._ufunc = ufunc

    def __call__(self, *args, **kwargs):
        _refuse_host_arrays(list(args) + list(kwargs.values()))
        return _to_device(self._ufunc(*args, **kwargs))

    def __getattr__(self, name):   # .at, .reduce: DeviceArray.__array_ufunc__ watches those
        return getattr(self._ufunc, name)


class FakeEvent:
    """cupy.cuda.Event on the stand-in: done once a wait has come after its record()."""

    def __init__(self, device):
        self.device, self.serial, self.time = device, None, None

    def record(self, stream=None):
        self.serial = next(self.device.events)
        self.device.recorded = self.serial
        self.time = time.perf_counter()

    @property
    def done(self):
        return self.serial <= self.device.drained

    def synchronize(self):
        self.device.wait("Event.synchronize")


class FakeXp:
    """NumPy's namespace on the stand-in device, like `cupy` (what albor calls xp)."""

    ndarray = DeviceArray

    def __init__(self, device):
        self._device = device
        stream = types.SimpleNamespace(synchronize=lambda: device.wait("Stream.synchronize"))
        self.cuda = types.SimpleNamespace(
            Event=lambda: FakeEvent(device), get_current_stream=lambda: stream,
            get_elapsed_time=lambda start, end: 1000.0 * (end.time - start.time))

    def asarray(self, a, dtype=None):
        """The copy up (no wait): a host array becomes a device array; a device array stays."""
        if isinstance(a, DeviceArray):
            return a if dtype is None else a.astype(dtype, copy=False)
        return np.array(a, dtype=dtype).view(DeviceArray)

    array = asarray

    def asnumpy(self, a):
        """The copy down: a wait."""
        self._device.wait("asnumpy")
        return np.array(_host(a))

    def __getattr__(self, name):
        value = getattr(np, name)
        if isinstance(value, np.ufunc):
            return _DeviceUfunc(value)
        if callable(value) and not isinstance(value, type):
            return self._function(value, name)
        return value   # dtypes, constants

    def _function(self, function, name):
        def on_device(*args, **kwargs):
            _refuse_host_arrays(list(args) + list(kwargs.values()))
            if name in SYNCING_FUNCTIONS or (name == "where" and len(args) == 1):
                self._device.wait(name)
            with _DeviceCode():
                return _to_device(function(*_host(args), **{k: _host(v) for k, v in kwargs.items()}))
        return on_device


class FakeDevice:
    """The stand-in GPU: `xp` is its array module, `syncs` the host's waits so far (what each
    was), in order."""

    def __init__(self):
        self.syncs = []
        self.events = itertools.count(1)
        self.recorded = 0   # the serial of the last event recorded
        self.drained = 0    # events up to this serial are done
        self.xp = FakeXp(self)
        DeviceArray.device = self

    def wait(self, what):
        """The host waits for the device: everything queued so far is done."""
        self.syncs.append(what)
        self.drained = self.recorded

    def kernel_module(self, module):
        """`module` (get_function(name) -> a launch) launching as device code, on device arrays."""
        device_code = _DeviceCode

        class OnDevice:
            def get_function(self, name):
                launch = module.get_function(name)

                def run(grid, block, args, shared_mem=0):
                    with device_code():
                        return launch(grid, block, args, shared_mem)
                return run
        return OnDevice()
