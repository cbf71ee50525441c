"""ONNX → differentiable torch: a small interpreter that runs an onnx-ir graph with torch ops.

Why an interpreter of our own (checked 2026-12): onnxruntime-training stopped at 1.19;
``onnx2torch`` 1.5.15 (the newest on PyPI) requires torchvision and imports it at import time
(its NMS/RoIAlign converters), and no torchvision release imports beside torch 2.13; TVM
Relax's gradient pass needs a compiled TVM and covers fewer ops than its importer. Running the
graph node by node with ``torch.nn.functional`` gives autograd for free, keeps the ONNX
initializer names as the keys of the gradients (what the criteria and the plan use), and says
exactly which node it cannot run.

Covered (:data:`OPS`): the ops of CNNs, MLPs and transformer encoders after spa's
canonicalisation — Conv, ConvTranspose, Gemm, MatMul, BatchNormalization (inference),
LayerNormalization, InstanceNormalization, the element-wise arithmetic and activations, the
pools, Softmax/LogSoftmax, Reduce*, and the shape ops (Reshape, Flatten, Transpose, Concat,
Split, Slice, Gather, (Un)Squeeze, Expand, Shape, Cast, Where …). Anything else — recurrent
ops, control flow, custom domains, quantized ops — is refused with an
:class:`~spa.errors.UnsupportedError` naming the node and its op (exit 2).

torch is imported lazily: spa works without it; only gradient criteria need it
(``pip install 'spa[torch]'``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from spa.errors import UnsupportedError
from spa.graph import all_initializers, attr, canonical_domain, subgraphs

__all__ = ["OPS", "require_torch", "TorchGraph", "unsupported_nodes"]


def require_torch(what: str = "gradient criteria"):
    """``import torch``, or a one-line refusal that says how to get it."""
    try:
        import torch
    except ImportError:
        raise UnsupportedError(f"{what} need PyTorch: install spa[torch] (pip install 'spa[torch]')") from None
    return torch


# -- op implementations: f(torch, node, inputs) -> list of outputs -----------------------------
Impl = Callable[[Any, ir.Node, list[Any]], list[Any]]
OPS: dict[str, Impl] = {}


def _op(*names: str):
    def register(fn: Impl) -> Impl:
        for n in names:
            OPS[n] = fn
        return fn

    return register


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axes(node: ir.Node, x: list[Any], index: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or from input ``index`` (newer ones)."""
    a = attr(node, "axes")
    if a is not None:
        return list(a)
    if len(x) > index and x[index] is not None:
        return _ints(x[index])
    return None


def _unary(fn_name: str):
    return lambda torch, node, x: [getattr(torch, fn_name)(x[0])]


for _name, _fn in {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
                   "Abs": "abs", "Neg": "neg", "Reciprocal": "reciprocal", "Erf": "erf", "Sin": "sin", "Cos": "cos",
                   "Floor": "floor", "Ceil": "ceil", "Sign": "sign", "Not": "logical_not"}.items():
    OPS[_name] = _unary(_fn)

for _name, _fn in {"Add": "add", "Sub": "sub", "Mul": "mul", "Pow": "pow", "Equal": "eq", "Less": "lt",
                   "Greater": "gt", "LessOrEqual": "le", "GreaterOrEqual": "ge", "And": "logical_and", "Or": "logical_or"}.items():
    OPS[_name] = (lambda fn: lambda torch, node, x: [getattr(torch, fn)(x[0], x[1])])(_fn)


@_op("Div")
def _div(torch, node, x):
    a, b = x
    if not a.is_floating_point() and not b.is_floating_point():
        return [torch.div(a, b, rounding_mode="trunc")]
    return [a / b]


@_op("Identity", "Dropout")
def _identity(torch, node, x):
    return [x[0]] if node.op_type == "Identity" else [x[0], torch.ones_like(x[0], dtype=torch.bool)]


@_op("Max", "Min", "Sum", "Mean")
def _variadic(torch, node, x):
    out = x[0]
    for y in x[1:]:
        out = {"Max": torch.maximum, "Min": torch.minimum}.get(node.op_type, torch.add)(out, y)
    return [out / len(x) if node.op_type == "Mean" else out]


@_op("LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Gelu", "PRelu", "Clip")
def _activation(torch, node, x):
    F = torch.nn.functional
    t, op = x[0], node.op_type
    if op == "LeakyRelu":
        return [F.leaky_relu(t, attr(node, "alpha", 0.01))]
    if op == "Elu":
        return [F.elu(t, attr(node, "alpha", 1.0))]
    if op == "Celu":
        return [F.celu(t, attr(node, "alpha", 1.0))]
    if op == "Selu":
        a, g = attr(node, "alpha", 1.67326319217681884765625), attr(node, "gamma", 1.05070102214813232421875)
        return [g * torch.where(t > 0, t, a * (torch.exp(t) - 1))]
    if op == "HardSigmoid":
        return [torch.clamp(attr(node, "alpha", 0.2) * t + attr(node, "beta", 0.5), 0, 1)]
    if op == "HardSwish":
        return [t * torch.clamp(t / 6 + 0.5, 0, 1)]
    if op == "Softplus":
        return [F.softplus(t)]
    if op == "Softsign":
        return [t / (1 + t.abs())]
    if op == "Gelu":
        return [F.gelu(t, approximate=attr(node, "approximate", "none"))]
    if op == "PRelu":
        return [torch.where(t >= 0, t, t * x[1])]
    lo = x[1] if len(x) > 1 and x[1] is not None else attr(node, "min")
    hi = x[2] if len(x) > 2 and x[2] is not None else attr(node, "max")
    return [torch.clamp(t, lo, hi)]


def _pads(node: ir.Node, rank: int) -> list[int]:
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedError(f"node '{node.name}' ({node.op_type}): auto_pad={attr(node, 'auto_pad')} is not covered")
    return list(attr(node, "pads", [0] * (2 * rank)))


def _padded(torch, t, pads: list[int], value: float = 0.0):
    """Apply ONNX pads ([b1, b2, …, e1, e2, …]) to the spatial axes; returns (t, symmetric pads)."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return t, begin
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return torch.nn.functional.pad(t, flat, value=value), [0] * n


@_op("Conv", "ConvTranspose")
def _conv(torch, node, x):
    F = torch.nn.functional
    t, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    rank = w.dim() - 2
    strides = list(attr(node, "strides", [1] * rank))
    dil = list(attr(node, "dilations", [1] * rank))
    group = attr(node, "group", 1)
    pads = _pads(node, rank)
    if node.op_type == "Conv":
        t, sym = _padded(torch, t, pads)
        fn = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
        return [fn(t, w, b, strides, sym, dil, group)]
    if attr(node, "output_shape") is not None or pads[: rank] != pads[rank:]:
        raise UnsupportedError(f"node '{node.name}' (ConvTranspose): output_shape or asymmetric pads are not covered")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    return [fn(t, w, b, strides, pads[:rank], list(attr(node, "output_padding", [0] * rank)), group, dil)]


@_op("MaxPool", "AveragePool")
def _pool(torch, node, x):
    F = torch.nn.functional
    t = x[0]
    k = list(attr(node, "kernel_shape"))
    rank = len(k)
    strides = list(attr(node, "strides", [1] * rank))
    pads = _pads(node, rank)
    ceil = bool(attr(node, "ceil_mode", 0))
    if node.op_type == "MaxPool":
        if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
            raise UnsupportedError(f"node '{node.name}' (MaxPool): the Indices output is not covered")
        t, sym = _padded(torch, t, pads, value=-math.inf)
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
        return [fn(t, k, strides, sym, list(attr(node, "dilations", [1] * rank)), ceil_mode=ceil)]
    include = bool(attr(node, "count_include_pad", 0))
    t, sym = _padded(torch, t, pads) if include else (t, pads[:rank])
    if pads[:rank] != pads[rank:] and not include:
        raise UnsupportedError(f"node '{node.name}' (AveragePool): asymmetric pads without count_include_pad are not covered")
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
    return [fn(t, k, strides, sym, ceil_mode=ceil, count_include_pad=include)]


@_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(torch, node, x):
    dims = tuple(range(2, x[0].dim()))
    if node.op_type == "GlobalAveragePool":
        return [x[0].mean(dim=dims, keepdim=True)]
    return [x[0].amax(dim=dims, keepdim=True)]


@_op("Gemm")
def _gemm(torch, node, x):
    a, b = x[0], x[1]
    if attr(node, "transA", 0):
        a = a.transpose(0, 1)
    if attr(node, "transB", 0):
        b = b.transpose(0, 1)
    y = attr(node, "alpha", 1.0) * (a @ b)
    if len(x) > 2 and x[2] is not None:
        y = y + attr(node, "beta", 1.0) * x[2]
    return [y]


@_op("MatMul")
def _matmul(torch, node, x):
    return [torch.matmul(x[0], x[1])]


@_op("BatchNormalization")
def _batchnorm(torch, node, x):
    if attr(node, "training_mode", 0):
        raise UnsupportedError(f"node '{node.name}' (BatchNormalization): training_mode=1 is not covered")
    t, scale, bias, mean, var = x[:5]
    shape = [1, -1] + [1] * (t.dim() - 2)
    inv = scale / torch.sqrt(var + attr(node, "epsilon", 1e-5))
    return [(t - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)]


@_op("InstanceNormalization")
def _instancenorm(torch, node, x):
    return [torch.nn.functional.instance_norm(x[0], weight=x[1], bias=x[2], eps=attr(node, "epsilon", 1e-5))]


@_op("LayerNormalization")
def _layernorm(torch, node, x):
    t = x[0]
    axis = attr(node, "axis", -1) % t.dim()
    if len(node.outputs) > 1 and any(o is not None and o.uses() for o in node.outputs[1:]):
        raise UnsupportedError(f"node '{node.name}' (LayerNormalization): Mean/InvStdDev outputs are not covered")
    shape = t.shape[axis:]
    b = x[2] if len(x) > 2 else None
    return [torch.nn.functional.layer_norm(t, shape, x[1].expand(shape), None if b is None else b.expand(shape), attr(node, "epsilon", 1e-5))]


@_op("Softmax", "LogSoftmax")
def _softmax(torch, node, x):
    axis = attr(node, "axis", -1)
    fn = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    return [fn(x[0], dim=axis)]


@_op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare")
def _reduce(torch, node, x):
    t = x[0]
    axes = _axes(node, x, 1)
    keep = bool(attr(node, "keepdims", 1))
    if not axes:
        if attr(node, "noop_with_empty_axes", 0):
            return [t]
        axes = list(range(t.dim()))
    op = node.op_type
    if op == "ReduceMean":
        return [t.mean(dim=axes, keepdim=keep)]
    if op == "ReduceSum":
        return [t.sum(dim=axes, keepdim=keep)]
    if op == "ReduceSumSquare":
        return [(t * t).sum(dim=axes, keepdim=keep)]
    if op == "ReduceL2":
        return [torch.sqrt((t * t).sum(dim=axes, keepdim=keep))]
    if op == "ReduceMax":
        return [t.amax(dim=axes, keepdim=keep)]
    if op == "ReduceMin":
        return [t.amin(dim=axes, keepdim=keep)]
    out = t
    for a in sorted((a % t.dim() for a in axes), reverse=True):
        out = out.prod(dim=a, keepdim=keep)
    return [out]


@_op("Reshape")
def _reshape(torch, node, x):
    shape = _ints(x[1])
    if not attr(node, "allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(shape)]


@_op("Flatten")
def _flatten(torch, node, x):
    axis = attr(node, "axis", 1) % max(x[0].dim(), 1)
    lead = int(np.prod(x[0].shape[:axis])) if axis else 1
    return [x[0].reshape(lead, -1)]


@_op("Transpose")
def _transpose(torch, node, x):
    perm = attr(node, "perm")
    return [x[0].permute(*(perm if perm is not None else reversed(range(x[0].dim()))))]


@_op("Concat")
def _concat(torch, node, x):
    return [torch.cat([t for t in x if t is not None], dim=attr(node, "axis"))]


@_op("Split")
def _split(torch, node, x):
    axis = attr(node, "axis", 0)
    sizes = attr(node, "split")
    if sizes is None and len(x) > 1 and x[1] is not None:
        sizes = _ints(x[1])
    n = len(node.outputs)
    if sizes is None:
        size = x[0].shape[axis]
        step = -(-size // n)
        sizes = [min(step, size - i * step) for i in range(n)]
    return list(torch.split(x[0], list(sizes), dim=axis))


@_op("Slice")
def _slice(torch, node, x):
    t = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index = [slice(None)] * t.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        n = t.shape[a]
        if st < 0:
            idx = list(range(n))[slice(s if s < n else None, e if e >= -n else None, st)]
            t = t.index_select(a, torch.tensor(idx, dtype=torch.long))
            continue
        index[a] = slice(max(min(s, n), -n), max(min(e, n), -n - 1) if e < 0 else min(e, n), st)
    return [t[tuple(index)]]


@_op("Gather")
def _gather(torch, node, x):
    axis = attr(node, "axis", 0) % x[0].dim()
    idx = x[1].long()
    idx = torch.where(idx < 0, idx + x[0].shape[axis], idx)
    out = x[0].index_select(axis, idx.reshape(-1))
    return [out.reshape(*x[0].shape[:axis], *idx.shape, *x[0].shape[axis + 1 :])]


@_op("Unsqueeze")
def _unsqueeze(torch, node, x):
    t = x[0]
    axes = _axes(node, x, 1)
    rank = t.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        t = t.unsqueeze(a)
    return [t]


@_op("Squeeze")
def _squeeze(torch, node, x):
    axes = _axes(node, x, 1)
    if axes is None:
        return [x[0].squeeze()]
    t = x[0]
    for a in sorted((a % t.dim() for a in axes), reverse=True):
        t = t.squeeze(a)
    return [t]


@_op("Expand")
def _expand(torch, node, x):
    shape = _ints(x[1])
    target = torch.broadcast_shapes(tuple(x[0].shape), tuple(shape))
    return [x[0].expand(target)]


@_op("Tile")
def _tile(torch, node, x):
    return [x[0].repeat(*_ints(x[1]))]


@_op("Shape")
def _shape(torch, node, x):
    dims = list(x[0].shape)[attr(node, "start", 0) : attr(node, "end", None)]
    return [torch.tensor(dims, dtype=torch.int64)]


@_op("Size")
def _size(torch, node, x):
    return [torch.tensor(x[0].numel(), dtype=torch.int64)]


@_op("Cast")
def _cast(torch, node, x):
    dtype = ir.DataType(attr(node, "to"))
    return [x[0].to(_torch_dtype(torch, dtype.numpy()))]


@_op("Where")
def _where(torch, node, x):
    return [torch.where(x[0].bool(), x[1], x[2])]


@_op("ConstantOfShape")
def _constant_of_shape(torch, node, x):
    value = attr(node, "value")
    arr = value.numpy() if value is not None else np.zeros(1, np.float32)
    return [torch.full(_ints(x[0]), arr.reshape(-1)[0].item(), dtype=_torch_dtype(torch, arr.dtype))]


@_op("Range")
def _range(torch, node, x):
    return [torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)]


@_op("Constant")
def _constant(torch, node, x):
    value = attr(node, "value")
    if value is None:
        raise UnsupportedError(f"node '{node.name}' (Constant): only the 'value' form is covered")
    return [torch.from_numpy(np.array(value.numpy()))]


@_op("Pad")
def _pad(torch, node, x):
    if attr(node, "mode", "constant") != "constant":
        raise UnsupportedError(f"node '{node.name}' (Pad): mode {attr(node, 'mode')} is not covered")
    pads = _ints(x[1]) if len(x) > 1 else list(attr(node, "pads"))
    value = x[2].item() if len(x) > 2 and x[2] is not None else 0.0
    n = len(pads) // 2
    flat = []
    for b, e in zip(reversed(pads[:n]), reversed(pads[n:])):
        flat += [b, e]
    return [torch.nn.functional.pad(x[0], flat, value=value)]


def _torch_dtype(torch, dtype: np.dtype):
    return torch.from_numpy(np.zeros(1, dtype=dtype)).dtype


# -- the graph ---------------------------------------------------------------------------------


def unsupported_nodes(model: ir.Model) -> list[str]:
    """``'node (op)'`` for every node the interpreter cannot run (empty: it covers the model)."""
    bad = []
    for node in model.graph:
        if canonical_domain(node.domain) != "" or node.op_type not in OPS or subgraphs(node):
            bad.append(f"{node.name} ({node.domain + '.' if canonical_domain(node.domain) else ''}{node.op_type})")
    return bad


class TorchGraph:
    """The model as a function of its inputs and (some of) its initializers, in torch.

    ``params`` are the initializers as torch tensors (``dtype`` for floating ones). Calling the
    graph with ``params={name: tensor}`` overrides those initializers: pass tensors that
    require grad and backpropagate through the outputs.
    """

    def __init__(self, model: ir.Model, *, dtype: Any = None) -> None:
        torch = require_torch()
        bad = unsupported_nodes(model)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise UnsupportedError(f"cannot differentiate the model: no torch translation for {shown} "
                                   f"(spa.autodiff covers {len(OPS)} ONNX ops: CNN, MLP and transformer-encoder ops)")
        self.torch = torch
        self.model = model
        self.dtype = dtype or torch.float32
        self.params: dict[str, Any] = {}
        for name, value in all_initializers(model.graph).items():
            arr = np.array(value.const_value.numpy())
            t = torch.from_numpy(arr)
            self.params[name] = t.to(self.dtype) if t.is_floating_point() else t
        self.input_names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
        self.output_names = [v.name for v in model.graph.outputs]

    def __call__(self, feeds: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> list[Any]:
        torch = self.torch
        env: dict[str, Any] = dict(self.params)
        if params:
            env.update(params)
        for name in self.input_names:
            v = feeds[name]
            t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
            env[name] = t.to(self.dtype) if t.is_floating_point() else t
        for node in self.model.graph:
            args = [None if v is None or v.name == "" else env[v.name] for v in node.inputs]
            try:
                outs = OPS[node.op_type](torch, node, args)
            except UnsupportedError:
                raise
            except Exception as e:  # a shape torch refuses: say which node
                raise UnsupportedError(f"cannot differentiate node '{node.name}' ({node.op_type}): {type(e).__name__}: {e}".splitlines()[0]) from e
            for v, t in zip(node.outputs, outs):
                if v is not None and v.name:
                    env[v.name] = t
        return [env[n] for n in self.output_names]

    def leaves(self, names: Sequence[str]) -> dict[str, Any]:
        """Fresh copies of the named initializers that require grad."""
        return {n: self.params[n].detach().clone().requires_grad_(True) for n in names}
