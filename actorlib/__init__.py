"""actorlib: actors for GPU workloads over ZeroMQ + msgpack, without a cluster daemon."""

from . import dag as dag, exceptions as exceptions
from .actor import ActorClass as ActorClass, ActorHandle as ActorHandle, ActorMethod as ActorMethod, remote as remote
from .api import (
    available_resources as available_resources,
    cancel as cancel,
    cluster_resources as cluster_resources,
    get as get,
    get_actor as get_actor,
    init as init,
    is_initialized as is_initialized,
    kill as kill,
    nodes as nodes,
    shutdown as shutdown,
    wait as wait,
)
from .cluster import VirtualCluster as VirtualCluster
from .context import RuntimeContext as RuntimeContext, get_gpu_ids as get_gpu_ids, get_runtime_context as get_runtime_context
from .exceptions import (
    ActorDiedError as ActorDiedError,
    ActorLibError as ActorLibError,
    AuthenticationError as AuthenticationError,
    GetTimeoutError as GetTimeoutError,
    HeadUnreachableError as HeadUnreachableError,
    PlacementGroupError as PlacementGroupError,
    RemoteError as RemoteError,
    SerializationError as SerializationError,
    TaskCancelledError as TaskCancelledError,
)
from .object_ref import ObjectRef as ObjectRef, ObjectRefGenerator as ObjectRefGenerator
from .placement_group import (
    PlacementGroup as PlacementGroup,
    placement_group as placement_group,
    placement_group_table as placement_group_table,
    remove_placement_group as remove_placement_group,
)
from .rank_program import CommandFailedError as CommandFailedError
from .sharding import NamedSharding as NamedSharding
from .spmd import RunResult as RunResult, WorkerFailure as WorkerFailure, WorkerGroupError as WorkerGroupError
from .worker_group import MultiWorkerFuture as MultiWorkerFuture, WorkerGroup as WorkerGroup

__version__ = "0.1.0"

__all__ = [
    "ActorClass",
    "ActorDiedError",
    "ActorHandle",
    "ActorLibError",
    "ActorMethod",
    "CommandFailedError",
    "AuthenticationError",
    "GetTimeoutError",
    "HeadUnreachableError",
    "MultiWorkerFuture",
    "NamedSharding",
    "ObjectRef",
    "ObjectRefGenerator",
    "PlacementGroup",
    "PlacementGroupError",
    "RemoteError",
    "RunResult",
    "RuntimeContext",
    "SerializationError",
    "TaskCancelledError",
    "VirtualCluster",
    "WorkerFailure",
    "WorkerGroup",
    "WorkerGroupError",
    "available_resources",
    "cancel",
    "cluster_resources",
    "dag",
    "exceptions",
    "get",
    "get_actor",
    "get_gpu_ids",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "nodes",
    "placement_group",
    "placement_group_table",
    "remote",
    "remove_placement_group",
    "shutdown",
    "wait",
]
