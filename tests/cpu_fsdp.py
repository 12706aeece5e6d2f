"""Lightning's FSDP strategy made to run on CPU processes (gloo), so that tests can check our
use of it (sharded training, clipping, full checkpoints, resume) on a machine with no GPU.

Lightning refuses FSDP on the CPU by exact type, and passes FSDP the GPU index as device; torch
shards on the CPU when given the CPU device. Its full state dict copies shards to the CPU
(offload_to_cpu), which crashes when they already live there, so that copy is turned off.
"""

import lightning.pytorch.strategies.fsdp as lightning_fsdp
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.api import FullOptimStateDictConfig


def full_state_dict_in_place(module, world_size: int, rank0_only: bool = True):
    return FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


class CPUFSDPStrategy(FSDPStrategy):
    def setup_environment(self) -> None:
        lightning_fsdp._get_full_state_dict_context = full_state_dict_in_place
        super().setup_environment()

    def _setup_model(self, model: torch.nn.Module) -> FSDP:
        return FSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
