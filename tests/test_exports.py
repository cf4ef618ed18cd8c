"""Each package's face: every name in __all__ imports, and the list is what the docs promise."""

import importlib

import pytest

PROMISED = {
    "actorlib": {
        "init",
        "shutdown",
        "is_initialized",
        "remote",
        "get",
        "wait",
        "cancel",
        "kill",
        "get_actor",
        "get_gpu_ids",
        "get_runtime_context",
        "nodes",
        "cluster_resources",
        "available_resources",
        "ObjectRef",
        "ObjectRefGenerator",
        "ActorHandle",
        "RemoteError",
        "ActorDiedError",
        "GetTimeoutError",
        "TaskCancelledError",
        "PlacementGroupError",
        "SerializationError",
        "AuthenticationError",
        "ActorLibError",
        "exceptions",
    },
    "transport": {"Endpoint", "Kind", "Message", "dumps", "loads", "ProtocolError", "TransportError"},
    "scheduler": {"Head", "NodeAgent", "ForkServer", "ActorState", "NodePool"},
}


@pytest.mark.parametrize("package", sorted(PROMISED))
def test_all_names_import_and_include_the_promised_ones(package):
    mod = importlib.import_module(package)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{package}.{name} is in __all__ but does not import"
    missing = PROMISED[package] - set(mod.__all__)
    assert not missing, f"{package} does not export {sorted(missing)}"


def test_exceptions_module_has_the_design_names_and_one_base():
    from actorlib import exceptions

    for name in (
        "ActorLibError",
        "RemoteError",
        "ActorDiedError",
        "GetTimeoutError",
        "TaskCancelledError",
        "PlacementGroupError",
        "SerializationError",
        "AuthenticationError",
    ):
        cls = getattr(exceptions, name)
        assert issubclass(cls, exceptions.ActorLibError)


def test_layering_transport_and_scheduler_do_not_import_upwards():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    for package, forbidden in (("transport", ("scheduler", "actorlib")), ("scheduler", ("actorlib",))):
        for path in (root / package).glob("*.py"):
            text = path.read_text()
            for name in forbidden:
                assert f"import {name}" not in text and f"from {name}" not in text, f"{path.name} imports {name}"
