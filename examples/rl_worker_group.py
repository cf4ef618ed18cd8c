"""An RL step with worker groups, on any machine: logical GPUs and gloo stand in for real ones.

- a *trainer* group laid out dp=2 x tp=2: torch.distributed is initialised
  from the environment each worker gets; a batch is sharded over dp and
  replicated over tp, and each dp shard's loss comes back once (tp replicas
  agree, so their duplicates are dropped);
- a *generation* group of two tied groups of two workers (think: two
  inference engines with tensor parallelism 2); only each group's leader
  gets ``bundle_indices`` and owns the "engine"; prompts go to the leaders
  and generated tokens stream back.

Both groups share the same four GPUs (``max_colocated_worker_groups=2``: each
worker takes half a GPU), as colocated trainers and generators do.

    python examples/rl_worker_group.py
"""

from __future__ import annotations

import os

import actorlib
from actorlib import NamedSharding, VirtualCluster, WorkerGroup


class Trainer:
    def __init__(self, lr: float) -> None:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR/PORT come from the group
        self.rank = dist.get_rank()
        self.lr = lr
        torch.manual_seed(0)
        self.weight = torch.zeros(4)

    def train_step(self, batch: list[list[float]]) -> dict[str, float]:
        """One data-parallel step: local gradient, all-reduced over the whole group."""
        import torch
        import torch.distributed as dist

        x = torch.tensor(batch)
        grad = (x.mean(dim=0) - self.weight) * -1.0
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
        self.weight -= self.lr * grad
        loss = float(((x - self.weight) ** 2).mean())
        return {"rank": self.rank, "loss": round(loss, 4), "gpu": os.environ["CUDA_VISIBLE_DEVICES"]}

    def get_weights(self) -> list[float]:
        return self.weight.tolist()

    def close(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()


class Generator:
    def __init__(self, bundle_indices: tuple[int, list[int]] | None = None) -> None:
        self.is_leader = bundle_indices is not None
        self.engine_gpus = bundle_indices[1] if bundle_indices else None
        self.weights: list[float] = [0.0] * 4

    def update_weights(self, weights: list[float]) -> bool:
        self.weights = weights
        return True

    def generate(self, prompt: str, max_tokens: int):
        """Stream tokens; a real engine would run on its tied group's GPUs."""
        for i in range(max_tokens):
            yield f"{prompt}:{i}:{sum(self.weights):.2f}"


def main() -> None:
    actorlib.init(num_cpus=4, num_gpus=4)
    cluster = VirtualCluster([4], use_gpus=True, num_gpus_per_node=4, max_colocated_worker_groups=2, name="rl")

    trainers = WorkerGroup(
        cluster, Trainer, lr=0.5, sharding_annotations=NamedSharding([[0, 1], [2, 3]], ["dp", "tp"]), name_prefix="trainer"
    )
    generators = WorkerGroup(cluster, Generator, bundle_indices_list=[(0, [0, 1]), (0, [2, 3])], name_prefix="gen")
    print(f"trainer dp size {trainers.sharding_annotations.shape['dp']}, generation engines {generators.dp_size}")

    for step in range(2):
        # generation: prompts to each engine's leader, tokens stream back
        leaders = [generators.get_dp_leader_worker_idx(i) for i in range(generators.dp_size)]
        streams = [generators.run_single_worker_single_data("generate", w, f"p{w}", 3) for w in leaders]
        tokens = [actorlib.get(ref) for stream in streams for ref in stream]
        print(f"step {step}: generated {tokens}")

        # training: the batch is sharded over dp, replicated over tp
        batch = [[[1.0, 2.0, 3.0, 4.0]] * 2, [[2.0, 3.0, 4.0, 5.0]] * 2]
        future = trainers.run_all_workers_sharded_data(
            "train_step", batch, in_sharded_axes=["dp"], replicate_on_axes=["tp"], output_is_replicated=["tp"]
        )
        print(f"step {step}: losses per dp shard {trainers.get_all_worker_results(future, timeout=120)}")

        # weights from the trainer's rank 0 to every generator
        weights = actorlib.get(trainers.run_single_worker_single_data("get_weights", 0), timeout=60)
        assert all(actorlib.get(generators.run_all_workers_single_data("update_weights", weights), timeout=60))

    trainers.shutdown(cleanup_method="close", timeout=30)
    generators.shutdown()
    cluster.shutdown()
    actorlib.shutdown()


if __name__ == "__main__":
    main()
