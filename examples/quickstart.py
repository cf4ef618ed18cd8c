"""A five-minute tour of actorlib: an actor, sync and async calls, a generator, a remote error."""

import asyncio
import os

import actorlib


@actorlib.remote
class Counter:
    def __init__(self, start: int) -> None:
        self.value = start

    def add(self, n: int) -> int:  # sync methods run one at a time, in call order
        self.value += n
        return self.value

    async def slow_double(self, x: int) -> int:  # async methods run concurrently
        await asyncio.sleep(0.1)
        return 2 * x

    def countdown(self, n: int):  # generator methods stream their items back
        yield from range(n, 0, -1)

    def fail(self) -> None:
        raise ValueError("this actor refuses")

    def where(self) -> str:
        print(f"hello from the actor's process {os.getpid()}")  # shows up in the driver's output
        return f"pid {os.getpid()}"


def main() -> None:
    actorlib.init(num_cpus=2)

    counter = Counter.remote(10)
    print("add:", actorlib.get(counter.add.remote(5), timeout=30))
    print("where:", actorlib.get(counter.where.remote(), timeout=30))

    refs = [counter.slow_double.remote(i) for i in range(5)]  # 5 x 0.1 s, concurrently
    print("async:", actorlib.get(refs, timeout=30))

    print("stream:", [actorlib.get(ref) for ref in counter.countdown.remote(5)])

    async def from_asyncio() -> int:
        return await counter.add.remote(100)

    print("awaited:", asyncio.run(from_asyncio()))

    try:
        actorlib.get(counter.fail.remote(), timeout=30)
    except ValueError as err:  # a RemoteError, and also the ValueError the actor raised
        print("caught:", type(err).__name__, "-", err.message)

    actorlib.shutdown()


if __name__ == "__main__":
    main()
