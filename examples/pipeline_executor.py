"""The Ray GPU executor of an inference engine, without Ray: PP=2 x TP=2 workers and a compiled forward pass.

It follows the shape of the Ray executors LLM inference engines shipped
(vLLM's ``RayGPUExecutor`` and its descendants):

- one worker per GPU, placed by a placement group of one-GPU bundles;
- workers sorted by node (the driver's node first), each told the GPUs of its
  whole node in ``CUDA_VISIBLE_DEVICES`` and its ``local_rank`` among them;
- torch.distributed initialised across all of them (rendezvous on a
  ``TCPStore`` that rank 0 hosts on a port the OS picked), with one
  tensor-parallel group per pipeline stage;
- ``_run_workers``: one method on every worker, with the same arguments for
  all, or ``all_args`` / ``all_kwargs`` per worker, optionally at most
  ``max_concurrent_workers`` at a time;
- the forward pass as a compiled graph: the driver's request goes to the
  first stage's TP workers, each of which hands its ``IntermediateTensors``
  (hidden states and residual) to the matching TP worker of the next stage
  over a torch.distributed channel; the last stage's workers sample.

On a machine with 4 or more CUDA devices it uses NCCL (for the TP groups and
for the CUDA tensors between stages; the request's CPU tensors take gloo). Anywhere else it runs on CPU with logical
GPUs and gloo, on two logical nodes of two GPUs each, so the node sorting and
per-node ``CUDA_VISIBLE_DEVICES`` have something to do.

    python examples/pipeline_executor.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import defaultdict
from typing import Any

import torch

import actorlib
import actorlib.testing
from actorlib.dag import InputNode, MultiOutputNode

PP, TP = 2, 2
HIDDEN, VOCAB = 8, 16


@dataclasses.dataclass
class IntermediateTensors:
    """What a pipeline stage hands the next one."""

    tensors: dict[str, torch.Tensor]


def make_weights() -> dict[str, torch.Tensor]:
    """The whole (tiny) model, the same in every process: a generator of its own, no global seeding."""
    gen = torch.Generator().manual_seed(1234)
    return {
        "embed": torch.randn(VOCAB, HIDDEN, generator=gen),
        "layer0": torch.randn(HIDDEN, HIDDEN, generator=gen) / HIDDEN**0.5,
        "layer1": torch.randn(HIDDEN, HIDDEN, generator=gen) / HIDDEN**0.5,
        "lm_head": torch.randn(HIDDEN, VOCAB, generator=gen),
    }


def reference_step(weights: dict[str, torch.Tensor], token_ids: torch.Tensor) -> torch.Tensor:
    """The same forward pass in one process, no parallelism: what the workers must agree with."""
    x = weights["embed"][token_ids]
    h = torch.tanh(x @ weights["layer0"])
    h = torch.tanh(h @ weights["layer1"]) + x
    return (h @ weights["lm_head"]).argmax(dim=-1)


class Worker:
    """One GPU's worker: a shard of one pipeline stage of the model."""

    def __init__(self) -> None:
        self.rank = -1
        self._store: Any = None

    def get_node_and_gpu_ids(self) -> tuple[str, list[int | str]]:
        return actorlib.get_runtime_context().get_node_id(), actorlib.get_gpu_ids()

    def update_environment_variables(self, envs: dict[str, str]) -> None:
        os.environ.update(envs)

    def host_store(self) -> int:
        """Rank 0 hosts the rendezvous store on a port the OS picks (no port scanning)."""
        import torch.distributed as dist

        self._store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
        return int(self._store.port)

    def init_worker(self, rank: int, local_rank: int, world_size: int, store_host: str, store_port: int, backend: str) -> str:
        import torch.distributed as dist

        self.rank, self.local_rank, self.world_size, self.backend = rank, local_rank, world_size, backend
        store = self._store or dist.TCPStore(store_host, store_port, None, False)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        # one TP group per pipeline stage: every rank makes every group, in the same order (new_group is collective)
        groups = [dist.new_group(list(range(pp * TP, (pp + 1) * TP))) for pp in range(PP)]
        self.pp_rank, self.tp_rank = divmod(rank, TP)
        self.tp_group = groups[self.pp_rank]
        return f"rank {rank}: pp {self.pp_rank} tp {self.tp_rank} local_rank {local_rank} CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}"

    def init_device(self) -> str:
        self.device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        return str(self.device)

    def load_model(self) -> int:
        """Keep this stage's shard: row-parallel layers (a slice of the input dimension), a column-parallel lm_head."""
        weights = make_weights()
        shard = HIDDEN // TP
        rows = slice(self.tp_rank * shard, (self.tp_rank + 1) * shard)
        cols = slice(self.tp_rank * (VOCAB // TP), (self.tp_rank + 1) * (VOCAB // TP))
        self.embed = weights["embed"].to(self.device)
        self.layer = weights[f"layer{self.pp_rank}"][rows].to(self.device)
        self.rows = rows
        self.lm_head = weights["lm_head"][:, cols].to(self.device)
        return sum(t.numel() for t in (self.embed, self.layer, self.lm_head))

    def _row_parallel(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        partial = x[:, self.rows] @ self.layer
        dist.all_reduce(partial, group=self.tp_group)
        return torch.tanh(partial)

    def execute_model_spmd(self, req_or_stage: Any) -> Any:
        """One step of the forward pass for this stage (the compiled graph's node)."""
        import torch.distributed as dist

        if self.pp_rank == 0:
            token_ids = req_or_stage["token_ids"].to(self.device)
            x = self.embed[token_ids]
            hidden = self._row_parallel(x)
            return req_or_stage, IntermediateTensors({"hidden_states": hidden, "residual": x})
        req, intermediate = req_or_stage
        hidden = self._row_parallel(intermediate.tensors["hidden_states"]) + intermediate.tensors["residual"]
        logits = hidden @ self.lm_head  # this rank's slice of the vocabulary
        pieces = [torch.empty_like(logits) for _ in range(TP)]
        dist.all_gather(pieces, logits, group=self.tp_group)
        next_ids = torch.cat(pieces, dim=-1).argmax(dim=-1)
        return {"request": req["request_id"], "next_token_ids": next_ids.cpu()} if self.tp_rank == 0 else None

    def shutdown(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()


class PipelineExecutor:
    def __init__(self, use_nccl: bool) -> None:
        self.backend = "nccl" if use_nccl else "gloo"
        world = PP * TP
        self.pg = actorlib.placement_group([{"GPU": 1}] * world, strategy="PACK")
        assert self.pg.wait(timeout_seconds=60), "the placement group could not be placed"
        worker_cls = actorlib.remote(Worker)
        workers = [worker_cls.options(placement_group=self.pg, bundle_index=i, num_gpus=1).remote() for i in range(world)]

        # sort the workers by node, the driver's node first, as the Ray executors do
        here = actorlib.get_runtime_context().get_node_id()
        placed = actorlib.get([w.get_node_and_gpu_ids.remote() for w in workers], timeout=120)
        order = sorted(range(world), key=lambda i: (placed[i][0] != here, placed[i][0], i))
        self.workers = [workers[i] for i in order]
        node_and_gpus = [placed[i] for i in order]
        node_workers: dict[str, list[int]] = defaultdict(list)
        node_gpus: dict[str, list[int | str]] = defaultdict(list)
        for rank, (node, gpus) in enumerate(node_and_gpus):
            node_workers[node].append(rank)
            node_gpus[node].extend(gpus)

        # each worker sees every GPU of its node, and picks its own by local_rank
        self._run_workers(
            "update_environment_variables",
            all_args=[
                ({"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in sorted(node_gpus[node], key=_gpu_order))},)
                for node, _ in node_and_gpus
            ],
        )
        port = actorlib.get(self.workers[0].host_store.remote(), timeout=60)
        host = next(n["address"] for n in actorlib.nodes() if n["node_id"] == node_and_gpus[0][0])
        layout = self._run_workers(
            "init_worker",
            all_kwargs=[
                {
                    "rank": rank,
                    "local_rank": node_workers[node].index(rank),
                    "world_size": world,
                    "store_host": host,
                    "store_port": port,
                    "backend": self.backend,
                }
                for rank, (node, _) in enumerate(node_and_gpus)
            ],
        )
        nodes = list(node_workers)  # in the sorted order: the driver's node is node 0
        for line, (node, _) in zip(layout, node_and_gpus, strict=True):
            print(f"node {nodes.index(node)}, {line}")
        print("devices:", self._run_workers("init_device"))
        print("parameters per worker:", self._run_workers("load_model", max_concurrent_workers=2))
        self.pp_tp_workers = [self.workers[pp * TP : (pp + 1) * TP] for pp in range(PP)]
        self.forward = self._compiled_forward()

    def _run_workers(
        self,
        method: str,
        *args: Any,
        all_args: list[tuple[Any, ...]] | None = None,
        all_kwargs: list[dict[str, Any]] | None = None,
        max_concurrent_workers: int | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``method`` on every worker and return their results in rank order.

        The same ``*args, **kwargs`` for all, or ``all_args`` / ``all_kwargs``
        with one entry per worker; ``max_concurrent_workers`` calls at most that
        many at a time (e.g. to load weights a few workers at a time).
        """
        count = len(self.workers)
        for name, given in (("all_args", all_args), ("all_kwargs", all_kwargs)):
            if given is not None and len(given) != count:
                raise ValueError(f"{name} has {len(given)} entries for {count} workers")
        per_args = all_args if all_args is not None else [args] * count
        per_kwargs = all_kwargs if all_kwargs is not None else [kwargs] * count
        step = max_concurrent_workers or count
        results: list[Any] = []
        for start in range(0, count, step):
            refs = [
                getattr(w, method).remote(*per_args[i], **per_kwargs[i])
                for i, w in enumerate(self.workers[start : start + step], start=start)
            ]
            results.extend(actorlib.get(refs, timeout=300))
        return results

    def _compiled_forward(self) -> Any:
        # "auto": CUDA tensors (the hidden states on GPUs) over NCCL; CPU ones over gloo, or inside the message
        # to the next stage when the value's CPU tensors are small (the request's token ids; this toy model's states)
        transport = "auto"
        with InputNode() as request:
            outputs = [request for _ in self.pp_tp_workers[0]]
            for pp_rank, tp_group in enumerate(self.pp_tp_workers):
                outputs = [worker.execute_model_spmd.bind(outputs[i]) for i, worker in enumerate(tp_group)]
                if pp_rank < PP - 1:  # intermediate tensors cross to the next stage's matching TP worker
                    outputs = [output.with_tensor_transport(transport) for output in outputs]
            forward = MultiOutputNode(outputs)
        return forward.compile(max_inflight=4)

    def execute_model(self, request: dict[str, Any]) -> dict[str, Any]:
        return actorlib.get(self.forward.execute(request), timeout=120)[0]

    async def execute_model_async(self, request: dict[str, Any]) -> dict[str, Any]:
        return (await self.forward.execute_async(request))[0]

    def shutdown(self) -> None:
        self.forward.teardown()
        self._run_workers("shutdown")
        actorlib.remove_placement_group(self.pg)


def main() -> None:
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= PP * TP
    if use_nccl:
        actorlib.init(num_gpus=PP * TP)
    else:
        actorlib.init(num_cpus=4, num_gpus=2)  # two logical nodes of two logical GPUs
        actorlib.testing.add_node(num_cpus=4, num_gpus=2)
    executor = PipelineExecutor(use_nccl)
    print(f"PP={PP} x TP={TP} over {executor.backend}")
    weights = make_weights()

    # one sequence batch, step by step
    tokens = torch.tensor([1, 5, 7, 3])
    expected = tokens.clone()
    for step in range(4):
        out = executor.execute_model({"request_id": f"r{step}", "token_ids": tokens})
        tokens, expected = out["next_token_ids"], reference_step(weights, expected)
        print(f"step {step}: {out['request']} -> {tokens.tolist()} (reference {expected.tolist()})")
    print("matches the single-process reference:", torch.equal(tokens, expected))

    # several batches in flight at once: stage 0 works on one while stage 1 works on another
    async def pipelined() -> list[dict[str, Any]]:
        batches = [torch.tensor([i, i + 1, i + 2]) for i in range(0, 12, 3)]
        return await asyncio.gather(
            *(executor.execute_model_async({"request_id": f"b{i}", "token_ids": b}) for i, b in enumerate(batches))
        )

    outs = asyncio.run(pipelined())
    agree = all(
        torch.equal(o["next_token_ids"], reference_step(weights, torch.tensor([i, i + 1, i + 2])))
        for o, i in zip(outs, range(0, 12, 3), strict=True)
    )
    print(f"pipelined: {[o['request'] for o in outs]} all match the reference: {agree}")
    executor.shutdown()
    actorlib.shutdown()


def _gpu_order(gpu: int | str) -> tuple[int, int, str]:
    """GPU ids in device order: "2" before "10" (a string sort puts "10" first on a node of 10 or more)."""
    text = str(gpu)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


if __name__ == "__main__":
    main()
