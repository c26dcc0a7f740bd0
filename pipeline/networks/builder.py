"""Laying out a convolutional network as an ONNX graph, its weights from a `WeightSource`.

A layout (synctalk2d.py) calls `GraphBuilder.conv` with the PyTorch module names of each
convolution and of the BatchNorm after it; the weight source answers with the folded
weight and bias. `RandomWeights` draws deterministic ones (the bench model);
`StateDictWeights` folds them from a trained state dict, checking every key and shape as
the layout asks for it. The same layout thus builds both, node for node.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
    import onnx

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which SyncTalk-2D keeps


class ConvKey(NamedTuple):
    """Where a convolution's parameters live in a state dict."""

    conv: str              # the Conv2d's module name ("inc.inconv.0.conv.0")
    bn: str | None = None  # the BatchNorm2d folded into it, if any
    bias: bool = False     # whether the Conv2d has a bias of its own


class WeightSource(Protocol):
    def conv(self, key: ConvKey, shape: tuple[int, int, int, int],
             gain: float) -> tuple[np.ndarray, np.ndarray]:
        """(weight [cout, cin / groups, k, k], bias [cout]) float32 of one convolution with
        its BatchNorm folded in; `gain` scales random weights and is ignored otherwise."""
        ...


class ArchitectureError(Exception):
    """A state dict that does not fit the architecture; the message names the first bad key."""


@dataclass
class RandomWeights:
    """Deterministic He-uniform weights, drawn in layout order (the bench model)."""

    rng: np.random.Generator

    def conv(self, key: ConvKey, shape: tuple[int, int, int, int],
             gain: float) -> tuple[np.ndarray, np.ndarray]:
        cout, cin_per_group, kh, kw = shape
        return (self._uniform(shape, cin_per_group * kh * kw, gain),
                self._uniform((cout,), cout, 0.05))

    def _uniform(self, shape: tuple[int, ...], fan_in: int, gain: float) -> np.ndarray:
        limit = gain * np.sqrt(6.0 / fan_in)
        return ((self.rng.random(shape) * 2.0 - 1.0) * limit).astype(np.float32)


@dataclass
class StateDictWeights:
    """Folded weights from a state dict; every key the layout reads is checked, and
    `check_all_used` then refuses any key the layout never asked for."""

    tensors: dict[str, np.ndarray]
    what: str                           # the architecture, for messages
    used: set[str] = field(default_factory=set)

    def conv(self, key: ConvKey, shape: tuple[int, int, int, int],
             gain: float) -> tuple[np.ndarray, np.ndarray]:
        cout = shape[0]
        weight = self._take(f"{key.conv}.weight", shape).astype(np.float64)
        bias = (self._take(f"{key.conv}.bias", (cout,)).astype(np.float64) if key.bias
                else np.zeros(cout))
        if key.bn is not None:
            gamma, beta, mean, var = (self._take(f"{key.bn}.{name}", (cout,)).astype(np.float64)
                                      for name in ("weight", "bias", "running_mean",
                                                   "running_var"))
            self._take(f"{key.bn}.num_batches_tracked", (), optional=True)
            if (var < 0).any():
                raise ArchitectureError(f"key '{key.bn}.running_var' has negative variances: "
                                        "not a trained BatchNorm")
            scale = gamma / np.sqrt(var + BN_EPS)
            weight = weight * scale[:, None, None, None]
            bias = (bias - mean) * scale + beta
        return weight.astype(np.float32), bias.astype(np.float32)

    def _take(self, name: str, shape: tuple[int, ...], optional: bool = False) -> np.ndarray:
        value = self.tensors.get(name)
        if value is None:
            if optional:
                return np.zeros(shape)
            raise ArchitectureError(f"missing key '{name}' (shape {list(shape)}) of {self.what}")
        if value.shape != shape:
            raise ArchitectureError(f"key '{name}' has shape {list(value.shape)}, {self.what} "
                                    f"has {list(shape)}")
        if not np.isfinite(value).all():
            raise ArchitectureError(f"key '{name}' holds NaN or infinite values")
        self.used.add(name)
        return value

    def check_all_used(self) -> None:
        for name in self.tensors:
            if name not in self.used:
                raise ArchitectureError(f"unexpected key '{name}': not part of {self.what}")


@dataclass
class GraphBuilder:
    """Collects nodes and initializers while a layout lays out its network (or while
    any other graph of ours is laid out: `weights` only for `conv`)."""

    weights: WeightSource | None = None
    nodes: list[Any] = field(default_factory=list)
    inits: list[Any] = field(default_factory=list)
    count: int = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}_{self.count}"

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, key: ConvKey, cin: int, cout: int, k: int = 1,
             stride: int | tuple[int, int] = 1, pad: int = 0, groups: int = 1,
             gain: float = 1.0) -> str:
        """A convolution with bias: a Conv2d and the BatchNorm after it, folded."""
        from onnx import numpy_helper

        assert self.weights is not None, "a graph with convolutions needs a weight source"
        base = self.name("conv")
        weight, bias = self.weights.conv(key, (cout, cin // groups, k, k), gain)
        self.inits.append(numpy_helper.from_array(weight, f"{base}.weight"))
        self.inits.append(numpy_helper.from_array(bias, f"{base}.bias"))
        strides = list(stride) if isinstance(stride, tuple) else [stride, stride]
        return self.op("Conv", [x, f"{base}.weight", f"{base}.bias"], kernel_shape=[k, k],
                       strides=strides, pads=[pad] * 4, group=groups)

    def constant(self, name: str, value: np.ndarray) -> str:
        """An initializer shared by every node that names it."""
        from onnx import numpy_helper

        if not any(t.name == name for t in self.inits):
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def model(self, graph_name: str, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto], doc: str) -> onnx.ModelProto:
        """The finished model, at the opset and IR version of every graph of ours (the
        caller names its producer, then checks it)."""
        from onnx import helper

        from pipeline.demo.graphs import IR_VERSION, OPSET

        graph = helper.make_graph(self.nodes, graph_name, inputs=inputs, outputs=outputs,
                                  initializer=self.inits)
        built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        built.ir_version = IR_VERSION
        built.doc_string = doc
        return built
