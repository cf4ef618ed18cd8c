"""Resources, nodes, actor placement and worker processes. Uses transport; knows nothing of actorlib."""

from .actors import ActorRecord as ActorRecord, ActorSpec as ActorSpec, ActorState as ActorState
from .forkserver import ForkServer as ForkServer, set_parent_death_signal as set_parent_death_signal
from .head import Head as Head
from .node import NodeAgent as NodeAgent
from .resources import NodePool as NodePool, detect_gpu_ids as detect_gpu_ids, normalize_demand as normalize_demand
from .session import (
    new_session_dir as new_session_dir,
    release_session as release_session,
    remove_sockets as remove_sockets,
    socket_dir as socket_dir,
)

__all__ = [
    "ActorRecord",
    "ActorSpec",
    "ActorState",
    "ForkServer",
    "Head",
    "NodeAgent",
    "NodePool",
    "detect_gpu_ids",
    "new_session_dir",
    "normalize_demand",
    "release_session",
    "remove_sockets",
    "set_parent_death_signal",
    "socket_dir",
]
