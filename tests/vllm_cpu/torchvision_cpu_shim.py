"""Lane-only shim: let PyPI's (CUDA) torchvision wheel import beside a CPU-only torch.

Installed by `tests/vllm_cpu/setup.sh` into `.venv-vllm`'s site-packages with a ``zz_torchvision_cpu_shim.pth`` line
(``import torchvision_cpu_shim``). It is NOT part of the cppo_trl library.

Problem: PyPI's torchvision 0.28.0 (the release paired with torch 2.13) is built against CUDA torch; its ``_C.so``
needs ``libc10_cuda.so``/``libtorch_cuda.so``/``libcudart.so.13``, so it cannot load beside torch 2.13.0+cpu.
torchvision swallows that failure (``extension._has_ops() -> False``) but ``torchvision/_meta_registrations.py``
then calls ``torch.library.register_fake("torchvision::nms")`` unconditionally, which raises
``RuntimeError: operator torchvision::nms does not exist`` and kills ``import torchvision`` (and with it
transformers' torchvision-backed fast image processors and vLLM's multimodal processors).

Fix: a ``sys.meta_path`` hook that runs right before ``torchvision/__init__.py`` executes. If ``_C.so`` can be
loaded (a real CPU build, or a CUDA torch) it does nothing. Otherwise it defines the ``torchvision::nms`` and
``torchvision::qnms`` schemas (the only ops torchvision registers unconditionally) with a small pure-PyTorch CPU
kernel for ``nms``, so every pure-Python part of torchvision (``transforms.v2``, ``transforms.functional``,
``InterpolationMode``, ``utils``, ``ops.boxes`` helpers that do not dispatch to C++) imports and works. The other C++
ops (roi_align, deform_conv2d, ...) keep torchvision's own "Couldn't load custom C++ ops" error, as do
``torchvision.io`` decoders (``image.so`` is a CUDA build too); the project does not use them.

The hook costs nothing at interpreter start (torch is imported only when torchvision is).
"""

import importlib.abc
import importlib.machinery
import os
import sys


_DONE = False


def _nms_cpu(dets, scores, iou_threshold):
    import torch

    if dets.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=dets.device)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = scores.argsort(descending=True)
    suppressed = torch.zeros(dets.size(0), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = torch.maximum(x1[i], x1)
        yy1 = torch.maximum(y1[i], y1)
        xx2 = torch.minimum(x2[i], x2)
        yy2 = torch.minimum(y2[i], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def define_missing_ops(package_dir):
    """Load torchvision's _C.so if possible, else define the schemas its import needs."""
    global _DONE
    if _DONE:
        return
    _DONE = True
    import torch

    so = os.path.join(package_dir, "_C.so")
    try:
        torch.ops.load_library(so)
        return  # a working build: nothing to do
    except (OSError, ImportError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    try:
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already defined (e.g. the shim ran in this process already)
        return
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _nms_cpu, "CPU")
    # keep the Library object alive, else its registrations are dropped
    sys.modules[__name__]._lib = lib
    os.environ.setdefault("CPPO_LANE_TORCHVISION_SHIM", "active")


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, package_dir):
        self._inner = inner
        self._dir = package_dir

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        define_missing_ops(self._dir)
        return self._inner.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision" or _DONE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not spec.submodule_search_locations:
            return spec
        spec.loader = _Loader(spec.loader, list(spec.submodule_search_locations)[0])
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
