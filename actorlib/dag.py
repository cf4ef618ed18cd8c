"""Compiled graphs: actor method calls wired together once, then executed many times.

::

    from actorlib.dag import InputNode, MultiOutputNode

    with InputNode() as inp:
        hidden = [w.stage0.bind(inp).with_tensor_transport("auto") for w in stage0_workers]
        dag = MultiOutputNode([w.stage1.bind(hidden[i]) for i, w in enumerate(stage1_workers)])
    compiled = dag.compile(max_inflight=8)
    actorlib.get(compiled.execute(request))      # or: await compiled.execute_async(request)
    compiled.teardown()

- ``InputNode()`` stands for the arguments of ``execute(*args, **kwargs)``:
  ``inp`` itself is the single positional argument, ``inp[i]`` the *i*-th,
  ``inp["k"]`` or ``inp.k`` a keyword argument.
- ``actor.method.bind(*args, **kwargs)`` is a call of ``method`` on that
  actor; its arguments may be graph nodes (at top level) or constants.
- ``node.with_tensor_transport("nccl" | "gloo" | "auto")`` says how the
  tensors in that node's output reach other actors (``auto``, the default:
  NCCL for CUDA tensors when both actors have a GPU; CPU tensors of a value
  whose CPU tensors total at most 64 KiB inside the ZeroMQ message to the
  next actor, cheaper than a rendezvous on gloo; gloo for the rest).
- ``MultiOutputNode([...])`` returns several nodes' outputs as a list.

``compile()`` sets everything up once (see :mod:`actorlib.dag_compiled`):
a persistent loop in every participating actor
(:mod:`actorlib.dag_worker`) and a torch.distributed process group per
direction between each pair of actors that exchange values
(:mod:`actorlib.dag_channel`). Values between stages go actor to actor —
tensors by torch.distributed, the rest over ZeroMQ — never through the
driver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .object_ref import ObjectRef, ObjectRefGenerator
from .worker import ASYNC, SYNC

if TYPE_CHECKING:
    from .actor import ActorHandle
    from .dag_compiled import CompiledDAG

__all__ = ["ClassMethodNode", "CompiledDAG", "DAGNode", "InputAttributeNode", "InputNode", "MultiOutputNode"]

TRANSPORTS = ("auto", "gloo", "nccl")


class DAGNode:
    """A node of a graph. Build graphs with :class:`InputNode`, ``.bind()`` and :class:`MultiOutputNode`."""

    _transport = "auto"

    def with_tensor_transport(self, transport: str = "auto") -> DAGNode:
        """How tensors in this node's output reach other actors: ``"nccl"``, ``"gloo"`` or ``"auto"`` (by device and size)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        self._transport = transport
        return self

    def compile(self, *, max_inflight: int = 8, timeout: float = 120.0) -> CompiledDAG:
        """Set the graph up on its actors; at most ``max_inflight`` executions run at once."""
        from .dag_compiled import compile_graph

        return compile_graph(self, max_inflight=max_inflight, timeout=timeout)


class InputNode(DAGNode):
    """The arguments of ``execute()``. Use as ``with InputNode() as inp: ...``."""

    def __enter__(self) -> InputNode:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __getitem__(self, key: int | str) -> InputAttributeNode:
        if isinstance(key, bool) or not isinstance(key, int | str) or (isinstance(key, int) and key < 0):
            raise TypeError(f"inp[...] takes a positional index >= 0 or a keyword name, not {key!r}")
        return InputAttributeNode(self, key)

    def __getattr__(self, name: str) -> InputAttributeNode:
        if name.startswith("_"):
            raise AttributeError(name)
        return InputAttributeNode(self, name)

    def with_tensor_transport(self, transport: str = "auto") -> DAGNode:
        raise TypeError("the input comes from the driver over ZeroMQ; set the transport on the nodes that send tensors")

    def __repr__(self) -> str:
        return "InputNode()"


class InputAttributeNode(DAGNode):
    """One argument of ``execute()``: ``inp[i]`` (positional) or ``inp["k"]`` / ``inp.k`` (keyword)."""

    def __init__(self, root: InputNode, key: int | str) -> None:
        self._root = root
        self._key = key

    def with_tensor_transport(self, transport: str = "auto") -> DAGNode:
        raise TypeError("the input comes from the driver over ZeroMQ; set the transport on the nodes that send tensors")

    def __repr__(self) -> str:
        return f"InputNode()[{self._key!r}]"


class ClassMethodNode(DAGNode):
    """``actor.method.bind(*args, **kwargs)``: one call of an actor method per execution."""

    def __init__(self, handle: ActorHandle, method: str, kind: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kind not in (SYNC, ASYNC):
            raise TypeError(f"{handle._class_name}.{method} is a generator: graph nodes must return one value")
        for value in (*args, *kwargs.values()):
            _check_argument(value, top=True)
        self._handle = handle
        self._method = method
        self._args = args
        self._kwargs = kwargs

    def __repr__(self) -> str:
        return f"{self._handle._class_name}.{self._method}.bind(...)"


class MultiOutputNode(DAGNode):
    """Several nodes' outputs, returned together as a list by each execution."""

    def __init__(self, nodes: list[DAGNode] | tuple[DAGNode, ...]) -> None:
        if not isinstance(nodes, list | tuple) or not nodes:
            raise TypeError("MultiOutputNode takes a non-empty list of nodes")
        for node in nodes:
            if not isinstance(node, ClassMethodNode):
                raise TypeError(f"MultiOutputNode's entries must be actor method nodes (.bind(...)), not {node!r}")
        self._nodes = list(nodes)

    def with_tensor_transport(self, transport: str = "auto") -> DAGNode:
        raise TypeError("set the transport on the nodes inside the MultiOutputNode")

    def __repr__(self) -> str:
        return f"MultiOutputNode({self._nodes!r})"


def _check_argument(value: Any, *, top: bool) -> None:
    """Graph nodes only as top-level arguments; no ObjectRefs (a graph's values come from the graph)."""
    if isinstance(value, DAGNode):
        if not top:
            raise TypeError(f"{value!r} is nested inside an argument; graph nodes must be top-level arguments of .bind()")
        if isinstance(value, MultiOutputNode):
            raise TypeError("a MultiOutputNode can only be the graph's output, not an argument")
        return
    if isinstance(value, ObjectRef | ObjectRefGenerator):
        raise TypeError("ObjectRefs cannot be bound into a compiled graph; pass values, or graph nodes")
    if isinstance(value, list | tuple):
        for item in value:
            _check_argument(item, top=False)
    elif isinstance(value, dict):
        for item in value.values():
            _check_argument(item, top=False)


def __getattr__(name: str) -> Any:
    if name == "CompiledDAG":  # the class lives with the compiler; imported lazily (it needs the runtime)
        from .dag_compiled import CompiledDAG

        return CompiledDAG
    raise AttributeError(name)
