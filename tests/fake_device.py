"""A fake accelerator for device tests on a machine without one.

A tensor "on the fake device" reports ``device == meta`` (what ``next(model.parameters()).device`` gives the code
under test) but carries real CPU values, so that computations whose results are needed (``float(x)``, ``unique``,
``solve``) still run. ``FakeDevice`` (a dispatch mode) applies the rules a CUDA device would:

- an operation mixing a fake-device tensor with a CPU tensor of one or more dimensions raises, as CUDA's "Expected
  all tensors to be on the same device" does (0-dim CPU tensors, CPU index tensors of indexing and cross-device
  ``copy_`` are allowed, as on CUDA);
- ``x.to(device)`` / ``torch.zeros(..., device=device)`` with ``device`` the fake device give fake-device tensors,
  ``.cpu()`` gives a plain CPU tensor;
- every floating-point operation that runs on the CPU while the mode is on is recorded (``cpu_ops``), so a test can
  assert that a computation never left the device even where it would not crash.

``to_fake_device(module)`` moves a module's parameters and buffers there (tied weights stay tied).
``FAKE_DEVICE_TRACE=1`` prints the stack of each recorded CPU operation (to find where it came from).
"""

from __future__ import annotations

import os
import traceback

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("meta")
# operations whose CPU index tensors CUDA accepts beside device tensors
_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
             torch.ops.aten._index_put_impl_.default}
_CROSS_DEVICE = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}
# operations that only make, move or re-view data (e.g. reading a file): not a computation left on the CPU
_DATA_MOVEMENT = {"detach", "alias", "view", "_unsafe_view", "lift_fresh", "set_", "empty", "empty_strided",
                  "_to_copy", "copy_", "clone", "as_strided", "expand", "t", "transpose", "permute", "slice", "select"}


class DeviceMismatch(RuntimeError):
    """A fake-device tensor met a CPU tensor (on CUDA: "Expected all tensors to be on the same device")."""


class FakeDeviceTensor(torch.Tensor):
    """A tensor on the fake device: reports ``meta``, computes on its CPU ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=FAKE, requires_grad=requires_grad)
        out.elem = elem
        return out

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"FakeDeviceTensor({self.elem!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {}, None)


def _is_fake_device(device) -> bool:
    return device is not None and torch.device(device).type == FAKE.type


def _dispatch(func, args, kwargs, mode: FakeDevice | None):
    flat, _ = tree_flatten((args, kwargs))
    fakes = [t for t in flat if isinstance(t, FakeDeviceTensor)]
    plain = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, FakeDeviceTensor)]
    if any(t.device.type == FAKE.type for t in plain):
        raise DeviceMismatch(f"{func}: a real meta tensor (made outside the fake device)")
    target = kwargs.get("device")
    to_fake = _is_fake_device(target) or (bool(fakes) and target is None)
    if fakes and func not in _CROSS_DEVICE:
        allowed = _INDEXING if func in _INDEXING else ()
        bad = [t for t in plain if t.dim() > 0 and not (allowed and t.dtype in (torch.long, torch.int, torch.bool))]
        if bad:
            raise DeviceMismatch(f"{func}: Expected all tensors to be on the same device, but found a CPU tensor "
                                 f"of shape {tuple(bad[0].shape)} beside tensors on the device")
    if mode is not None and not to_fake and not fakes:
        floats = [t for t in plain if t.is_floating_point() and t.numel() > 1]
        if floats and func.overloadpacket.__name__ not in _DATA_MOVEMENT:
            mode.cpu_ops.append(f"{func} on CPU {tuple(floats[0].shape)} {floats[0].dtype}")
            if os.environ.get("FAKE_DEVICE_TRACE"):
                traceback.print_stack(limit=8)
    if _is_fake_device(target):
        kwargs = {**kwargs, "device": torch.device("cpu")}
    unwrapped = {id(t.elem): t for t in fakes}
    args, kwargs = tree_map(lambda x: x.elem if isinstance(x, FakeDeviceTensor) else x, (args, kwargs))
    out = func(*args, **kwargs)
    if not to_fake:
        return out

    def wrap(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, FakeDeviceTensor):
            same = unwrapped.get(id(x))  # an in-place operation returns its argument
            return same if same is not None else FakeDeviceTensor(x)
        return x

    return tree_map(wrap, out)


class _Factories(TorchFunctionMode):
    """``torch.tensor(data, device=fake)`` copies to the device below the dispatcher's modes: build it on the CPU
    and wrap it. ``tolist`` refuses tensor subclasses: read the values. ``p.data = x`` must carry ``x``'s values."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _is_fake_device(kwargs.get("device")):
            return FakeDeviceTensor(func(*args, **{**kwargs, "device": torch.device("cpu")}))
        if func is torch.Tensor.tolist and isinstance(args[0], FakeDeviceTensor):  # works on CUDA tensors too
            return args[0].elem.tolist()
        if func == torch.Tensor.data.__set__ and isinstance(args[0], FakeDeviceTensor):
            # ``p.data = x`` swaps the tensor's metadata; its values live in ``elem``
            if not isinstance(args[1], FakeDeviceTensor):
                raise DeviceMismatch(f"setting .data of a device tensor to a {args[1].device} tensor")
            func(*args)
            args[0].elem = args[1].elem
            return None
        return func(*args, **kwargs)


class FakeDevice(TorchDispatchMode):
    """Within the context: the fake device's rules (see the module docstring); ``cpu_ops`` lists floating-point
    operations that ran on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu_ops: list[str] = []
        self._factories = _Factories()

    def __enter__(self):
        self._factories.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._factories.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {}, self)


def to_fake_device(module: nn.Module) -> nn.Module:
    """Move ``module``'s parameters and buffers to the fake device in place (shared tensors stay shared), as
    ``module.to(device)`` would."""
    moved: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and not isinstance(p.data, FakeDeviceTensor):
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(FakeDeviceTensor(p.detach().clone()), requires_grad=p.requires_grad)
                sub._parameters[name] = moved[id(p)]
        for name, b in list(sub._buffers.items()):
            if b is not None and not isinstance(b, FakeDeviceTensor):
                if id(b) not in moved:
                    moved[id(b)] = FakeDeviceTensor(b.clone())
                sub._buffers[name] = moved[id(b)]
        if hasattr(sub, "_device"):  # a LightningModule's ``device``, as its strategy's move sets it
            sub._device = FAKE
    return module


def on_fake_device(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lives on the fake device."""
    return isinstance(tensor, FakeDeviceTensor) or (isinstance(tensor, nn.Parameter)
                                                    and isinstance(tensor.data, FakeDeviceTensor))
