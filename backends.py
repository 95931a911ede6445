"""Where backward runs and where the reduced gradient lives: one process or DDP, DeepSpeed ZeRO-1/2, ZeRO-3, FSDP2.

A backend runs the micro-batches' backward passes, exposes the reduced gradient this rank owns as a
`GradSlice` (see ogpsa_core), clips and steps, and saves the optimizer state. The training loop calls, per
optimizer step: `micro_batch(sync)` + `backward(loss)` for each micro-batch (sync=True on the last one), then
projects `grad_slice`, then `clip_and_step(max_norm)`, then `check_projection(...)` on guarded steps.

Every DeepSpeed internal the project relies on is used in this file only, each by one class: where the gradient
partition is (ZeroGradSlice for ZeRO-1/2's partition tables and `averaged_gradients`, Zero3GradSlice for ZeRO-3's
gradient buffer), the accumulation state a reference collection must reset (`forget_gradient` of Zero12Backend and
Zero3Backend), and ZeRO-3's float32 optimizer groups (Zero3Backend.base_optimizer_params). deepspeed is pinned
exactly in requirements.txt. Likewise for FSDP2 (torch's `fully_shard`, applied by Accelerate): turning it on where
Accelerate would not (`enable_fsdp2`), the gradient shards (Fsdp2GradSlice) and the optimizer state's DTensors
(Fsdp2Backend).
"""

import bisect
import itertools
import math
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

import ogpsa_core
from ogpsa_core import GradSlice, Segment, merge_adjacent_views

# DeepSpeed zero_optimization keys that decide where each gradient entry lands on which rank, with DeepSpeed's
# defaults; the guard names those a config changes. The README's "DeepSpeed config files" says which are supported.
PARTITION_KEYS = {"round_robin_gradients": False, "overlap_comm": False, "contiguous_gradients": True,
                  "reduce_scatter": True, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8,
                  "use_multi_rank_bucket_allreduce": True, "stage3_param_persistence_threshold": 1e5,
                  "sub_group_size": 1e9, "stage3_max_live_parameters": 1e9, "offload_optimizer": None,
                  "offload_param": None}
# Guard tolerances. Norms: both sides sum the same stored gradient values in float32 or wider, only in another
# order, which moves a norm by ~1e-6 relative; a projection that edits memory the optimizer does not read moves it
# by the share it edited (6% with the round_robin_gradients bug). Cosine after projection, by the coarser dtype of
# the basis and the gradient: float32 rounding leaves ~1e-6; bfloat16 keeps 8 significant bits, and its rounding
# left up to 2e-3 (ZeRO-3 with bfloat16 gradient accumulation; the limit is 4 x 2^-8); the round_robin_gradients
# bug left 0.09-0.18.
GUARD_NORM_RTOL = 1e-3
GUARD_MAX_COS = {torch.float32: 1e-3, torch.bfloat16: 4 * 2.0 ** -8}


def configure_deepspeed(config, args, world_size):
    """Fill the DeepSpeed config's "auto" values from the flags; refuse settings OGPSA cannot honour."""
    def fill(key, value, flag_name):
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise SystemExit(f"DeepSpeed config sets {key}={config[key]} but {flag_name} gives {value}: make them "
                             "agree (or set it to \"auto\")")

    fill("train_micro_batch_size_per_gpu", args.per_device_train_batch_size, "--per_device_train_batch_size")
    fill("gradient_accumulation_steps", args.gradient_accumulation_steps, "--gradient_accumulation_steps")
    fill("train_batch_size", args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
         "per-device batch x accumulation x processes")
    fill("gradient_clipping", args.max_grad_norm, "--max_grad_norm")
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):  # 0 only meets this check before starting: it runs as DDP
        raise SystemExit(f"DeepSpeed zero_optimization.stage {zero.get('stage', 0)}: use 0 (run as DDP), 1, 2 or 3")
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") not in ("none", "cpu", None):
            raise SystemExit(f"DeepSpeed zero_optimization.{key}.device {zero[key]['device']} is not supported with "
                             "OGPSA: NVMe offload swaps the gradient partitions to disk, where the projection cannot "
                             "reach them; use \"cpu\"")
    for key in ("zero_quantized_gradients", "zero_quantized_weights"):
        if zero.get(key):
            raise SystemExit(f"DeepSpeed zero_optimization.{key} (ZeRO++) is not supported with OGPSA: it quantizes "
                             "what is communicated, and its kernels do not run on the CPU where the projection's "
                             "exactness is tested; remove it")
    if zero.get("zero_hpz_partition_size", 1) > 1:
        raise SystemExit("DeepSpeed zero_optimization.zero_hpz_partition_size (ZeRO++ hierarchical partitioning) is "
                         "not supported with OGPSA: untested; remove it")
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        # With optimizer offload DeepSpeed takes the clip norm during backward, before the projection runs: the
        # backend clips the projected gradient itself, so DeepSpeed must not clip again.
        config["gradient_clipping"] = 0.0
        if args.optim == "sgd":  # else Accelerate swaps any optimizer for DeepSpeedCPUAdam (AdamW: the same update)
            config["zero_force_ds_cpu_optimizer"] = False
    if config.get("fp16", {}).get("enabled") is True:
        raise SystemExit("DeepSpeed fp16.enabled is not supported: use bf16 (--bf16 True)")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise SystemExit(f"DeepSpeed config has a '{key}' section: the scripts build the optimizer and the "
                             "schedule from their flags; remove it")
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save", "auto") == "auto":
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # checkpoints hold the whole model


def enable_fsdp2(accelerator):
    """Shard with FSDP2 on CPU processes too. Accelerate turns FSDP on only for accelerator devices and would run
    plain DDP instead, without a word; torch's fully_shard works over gloo, so the scripts switch Accelerate to it
    with the launch config's settings, and the runs (and the tests) go through the code a GPU run uses."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` set from the config
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):  # pinned memory needs an accelerator; the copies are alike
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # Both states, as Accelerate's own initialisation leaves them on a GPU (the process state is copied into the
    # accelerator state whenever one is constructed).
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def describe_engine(accelerator):
    """One line for the log's start: the engine, its sharding and precision, the processes and the device."""
    from accelerate.utils import DistributedType

    where = f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''} on " \
            f"{accelerator.device.type}"
    if accelerator.is_fsdp2:
        from torch.distributed.fsdp import CPUOffloadPolicy

        plugin = accelerator.state.fsdp_plugin
        policy = plugin.mixed_precision_policy
        precision = (f"mixed precision: {str(policy.param_dtype).split('.')[-1]} compute, "
                     f"{str(policy.reduce_dtype).split('.')[-1]} gradient reduction, float32 sharded parameters"
                     if policy is not None and policy.param_dtype is not None else "float32")
        wrap = getattr(plugin.auto_wrap_policy, "__name__", "NO_WRAP").replace("_auto_wrap_policy", "")
        return (f"FSDP2 (fully_shard), {where}: parameters, gradients and optimizer state sharded on dim 0; "
                f"{precision}; reshard_after_forward {plugin.reshard_after_forward}; wrap {wrap}; CPU offload "
                f"{'on' if isinstance(plugin.cpu_offload, CPUOffloadPolicy) else 'off'}")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        zero = config["zero_optimization"]
        offload = [key.split("_")[1] for key in ("offload_optimizer", "offload_param")
                   if (zero.get(key) or {}).get("device") not in (None, "none")]
        return (f"DeepSpeed ZeRO-{zero.get('stage')}, {where}; "
                f"{'bf16' if config.get('bf16', {}).get('enabled') is True else 'float32'}"
                + (f"; {' and '.join(offload)} offloaded to the CPU" if offload else ""))
    precision = "bf16 autocast" if accelerator.mixed_precision == "bf16" else "float32"
    return f"{'DDP' if accelerator.num_processes > 1 else 'one process'}, {where}; {precision}"


class Backend:
    """Single process or DDP through Accelerate. Gradients live in one flat buffer (see ReplicatedGradSlice).

    The training loop calls, per optimizer step: `micro_batch(sync)` + `backward(loss)` for each micro-batch
    (sync=True on the last one, where DDP reduces), then projects `grad_slice`, then `clip_and_step(max_norm)`.
    """

    engine_name = "one process or DDP"  # recorded in checkpoints: a resume must use the same
    partition_settings = {}  # DeepSpeed zero_optimization keys the config moves from their defaults
    update_projector = None  # set by project_steps (--base_project_update)

    def __init__(self, accelerator, model, optimizer):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_slice = ogpsa_core.ReplicatedGradSlice(self.params)
        self.scheduled_optimizer = optimizer

    def project_steps(self, update_projector):
        """Project every optimizer step's change of the parameters (--base_project_update), right after the
        optimizer has stepped."""
        self.update_projector = update_projector

    def micro_batch(self, sync):
        """Context for one micro-batch's forward and backward; gradients are reduced across ranks only if sync."""
        return nullcontext() if sync else self.accelerator.no_sync(self.model)

    def backward(self, loss):
        self.accelerator.backward(loss)

    def clip_and_step(self, max_norm):
        """Clip (if max_norm > 0), step, zero the gradient; returns the norm before clipping (a tensor: reading it
        would wait for the device, so the loop reads it only when it logs)."""
        norm = self.clip_(max_norm)
        self.optimizer.step()
        if self.update_projector is not None:
            self.update_projector.project_()
        self.zero_grad()
        return norm

    def clip_(self, max_norm):
        """Scale the gradient to norm max_norm if it is larger (max_norm 0: no clipping); returns the norm before."""
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))

    def zero_grad(self):
        self.grad_slice.zero_()

    def stepped_norm(self, stats, clip_norm):
        """(the projected gradient's norm as the projection computed it, the norm clipping took of the gradient
        the optimizer stepped with)."""
        return stats.grad_norm_projected, float(clip_norm)

    def check_projection(self, stats, clip_norm, projector):
        """Guard against a silently wrong projection (run on the first step and on every logging step).

        Three independent checks: the gradient the projection edited has the norm the optimizer's clipping found
        (else the projection edited other memory than the optimizer read); it is orthogonal to the basis; and
        each parameter's float32 master entries, read through the projection's coordinates, equal the
        parameter's values (else the coordinates map entries to the wrong parameters).
        """
        ours, stepped = self.stepped_norm(stats, clip_norm)
        if not (math.isfinite(ours) and math.isfinite(stepped)):
            return  # a non-finite gradient is not a mapping problem
        problems = []
        if abs(ours - stepped) > GUARD_NORM_RTOL * max(ours, stepped):
            problems.append(f"the projected gradient's norm is {ours:.6g} but the optimizer stepped with one of "
                            f"norm {stepped:.6g}")
        coarsest = min(projector.dtype, self.grad_slice.dtype, key=lambda dtype: torch.finfo(dtype).bits)
        if projector.method == "orthogonal_projection" and stats.max_abs_cos > GUARD_MAX_COS[coarsest]:
            problems.append(f"after projection the gradient still has cosine {stats.max_abs_cos:.3g} with the basis")
        misplaced = self.grad_slice.misplaced_params(self.params)
        count = self.grad_slice.reduce_(torch.tensor(float(len(misplaced)), device=self.grad_slice.device))
        if count.item():
            problems.append(f"{int(count.item())} parameter pieces are not where the projection's coordinates put "
                            f"them (on this rank: parameters {misplaced[:5]})")
        if problems:
            settings = ", ".join(f"{k}={v}" for k, v in self.partition_settings.items())
            raise SystemExit("OGPSA guard: the projection does not act on the gradient the optimizer steps with: "
                             + "; ".join(problems) + ". "
                             + (f"Likely cause: the DeepSpeed zero_optimization settings that move gradient "
                                f"partitions ({settings}); set them to their defaults one at a time, and report "
                                "which one it is. " if settings else "")
                             + "Stopped so that no silently wrong model is trained.")

    def optimizer_state(self):
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state):
        self.optimizer.load_state_dict(state)


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO: the engine reduces and partitions the gradient; each rank projects its partition.

    Accelerate's `backward` would also step the engine, so the engine is driven directly: boundary flag,
    `engine.backward`, (projection), `engine.step()`, which clips with the projected partition's norm. Under
    optimizer offload DeepSpeed takes that norm during backward, before the projection, so the backend clips the
    projected gradient itself and DeepSpeed's clipping is off (see `configure_deepspeed`). Subclasses say where the
    partition lives and how to forget a gradient that was read but not stepped.
    """

    def __init__(self, accelerator, engine, optimizer, grad_slice_class):
        self.accelerator, self.model, self.optimizer, self.engine = accelerator, engine, optimizer, engine
        self.zero = engine.optimizer
        self.scheduled_optimizer = self.zero.optimizer  # the torch optimizer ZeRO steps: the schedule sets its lr
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.grad_slice = grad_slice_class(self.zero, self.params)
        self.masters = [master for _, master in self.grad_slice.masters()]
        zero_config = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
        self.partition_settings = {k: v for k, v in zero_config.items()
                                   if k in PARTITION_KEYS and v not in (PARTITION_KEYS[k], "auto")}

    def project_steps(self, update_projector):
        """ZeRO steps its float32 partitions one (sub-)group at a time and copies each to the model's precision
        right after its step; it gathers them once all have stepped. The step's change is projected once the
        last group has stepped, over all groups (the global scope couples them), and the earlier groups' copies
        are redone; DeepSpeed copies the last group and gathers as usual, so no extra communication. None
        restores DeepSpeed's own group step."""
        self.update_projector = update_projector
        self.zero.__dict__.pop("_optimizer_step", None)
        if update_projector is None:
            return
        step_group, last = self.zero._optimizer_step, self.num_groups - 1

        def step_group_then_project(group):
            step_group(group)
            if group == last:
                update_projector.project_()
                for earlier in range(last):
                    self.copy_to_model_precision(earlier)

        self.zero._optimizer_step = step_group_then_project

    def micro_batch(self, sync):
        self.engine.set_gradient_accumulation_boundary(sync)
        return nullcontext()

    def backward(self, loss):
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already normalised over the whole step

    def clip_and_step(self, max_norm):
        if not self.grad_slice.offload:
            self.engine.step()
            return torch.as_tensor(self.engine.get_global_grad_norm())
        norm = self.grad_slice.norm()
        if max_norm > 0:  # torch.nn.utils.clip_grad_norm_'s rule
            self.grad_slice.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        self.engine.step()
        return norm

    def stepped_norm(self, stats, clip_norm):
        """Under offload DeepSpeed took its norm during backward, before the projection."""
        if self.grad_slice.offload:
            return stats.grad_norm, self.engine.get_global_grad_norm()
        return stats.grad_norm_projected, float(clip_norm)

    def zero_grad(self):
        """Forget a gradient that was read but not stepped (reference collection), as `step()` would."""
        self.zero.zero_grad(set_to_none=True)
        self.forget_gradient()
        if self.grad_slice.offload:  # the gradient step() would read, on the CPU
            for master in self.masters:
                if master.grad is not None:
                    master.grad.zero_()

    def forget_gradient(self):
        raise NotImplementedError

    def optimizer_state(self):
        """This rank's float32 master partition and the state of the optimizer that updates it."""
        with self.base_optimizer_params():
            return {"masters": [m.detach() for m in self.masters], "base": self.zero.optimizer.state_dict()}

    def load_optimizer_state(self, state):
        for master, saved in zip(self.masters, state["masters"]):
            if master.shape != saved.shape:
                raise SystemExit("the checkpoint's ZeRO partitions do not fit this run: resume with the same "
                                 "number of processes and the same DeepSpeed config")
            master.data.copy_(saved)
        with self.base_optimizer_params():
            self.zero.optimizer.load_state_dict(state["base"])

    def base_optimizer_params(self):
        """Context in which the torch optimizer holds its float32 parameters (always, under ZeRO-1/2)."""
        return nullcontext()


class Zero12Backend(DeepSpeedBackend):
    engine_name = "DeepSpeed ZeRO-1/2"

    def __init__(self, accelerator, engine, optimizer):
        super().__init__(accelerator, engine, optimizer, ZeroGradSlice)
        self.num_groups = len(self.zero.bit16_groups)

    def copy_to_model_precision(self, group):
        """As step() does after the group's optimizer step: this rank's partition into the model's flat buffer."""
        rank = dist.get_rank(group=self.zero.real_dp_process_group[group])
        self.zero.parallel_partitioned_bit16_groups[group][rank].data.copy_(
            self.zero.single_partition_of_fp32_groups[group].data)

    def forget_gradient(self):
        for cache in (self.zero.averaged_gradients, self.zero.all_grad_tensors):
            for key in cache:
                cache[key] = None
        self.zero.micro_step_id = -1  # as step() leaves it: the next backward starts a fresh accumulation


class Zero3Backend(DeepSpeedBackend):
    engine_name = "DeepSpeed ZeRO-3"

    def __init__(self, accelerator, engine, optimizer):
        super().__init__(accelerator, engine, optimizer, Zero3GradSlice)
        self.num_groups = len(self.zero.fp16_groups)

    def copy_to_model_precision(self, group):
        self.zero._reassign_or_swap_out_partitioned_parameters(group)

    def forget_gradient(self):
        for key in self.zero.averaged_gradients:
            self.zero.averaged_gradients[key] = None
        # The next backward overwrites the buffer only where a gradient arrives: clear it all.
        self.zero.grad_partitions_flat_buffer.zero_()
        self.zero.micro_step_id = 0

    @contextmanager
    def base_optimizer_params(self):
        """ZeRO-3 hands its float32 partitions to the torch optimizer only while stepping; do as its checkpoints do."""
        self.zero._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            self.zero._clear_fp32_optimizer_param_groups()


class Fsdp2Backend(Backend):
    """FSDP2 (`fully_shard`, applied by Accelerate): every parameter is a DTensor sharded on dim 0 over the ranks;
    after the last micro-batch's backward each rank holds the reduced gradient of its own rows of every parameter,
    and its optimizer steps those rows. Each rank projects that shard (Fsdp2GradSlice), then clips with the global
    norm taken over the gradients' DTensors (the memory the optimizer reads) and steps. Accumulation runs without
    gradient sync on all but the last micro-batch (Accelerate's `no_sync` is FSDP2's `set_requires_gradient_sync`),
    so the reduced gradient is projected once per step. With --base_project_update the masters are the float32
    sharded parameters themselves, projected after the optimizer step and before the next forward gathers them.
    """

    engine_name = "FSDP2"

    def __init__(self, accelerator, model, optimizer):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.grad_slice = Fsdp2GradSlice(self.params, [name for name, _ in named])
        self.scheduled_optimizer = optimizer

    def clip_(self, max_norm):
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params])
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # a plain number, the same on every rank
        if max_norm > 0:  # torch.nn.utils.clip_grad_norm_'s rule, on the shards that the gradient DTensors view
            self.grad_slice.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def optimizer_state(self):
        """This rank's optimizer state: the DTensors (AdamW's moments, like the parameters) as their local shards."""
        from torch.distributed.tensor import DTensor

        state = self.optimizer.state_dict()
        return {**state, "state": {index: {key: value.to_local() if isinstance(value, DTensor) else value
                                           for key, value in entry.items()}
                                   for index, entry in state["state"].items()}}

    def load_optimizer_state(self, state):
        from torch.distributed.tensor import DTensor

        self.optimizer.load_state_dict(state)
        for param in self.params:  # back to DTensors sharded like their parameter
            for key, value in self.optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and not isinstance(value, DTensor):
                    if value.shape != param.to_local().shape:
                        raise SystemExit("the checkpoint's FSDP2 optimizer shards do not fit this run: resume with "
                                         "the same number of processes")
                    self.optimizer.state[param][key] = DTensor.from_local(
                        value, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(),
                        run_check=False)


def make_backend(accelerator, model, optimizer):
    from accelerate.utils import DistributedType

    if accelerator.is_fsdp2:
        return Fsdp2Backend(accelerator, model, optimizer)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return Backend(accelerator, model, optimizer)
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(model.optimizer, DeepSpeedZeroOptimizer_Stage3):
        return Zero3Backend(accelerator, model, optimizer)
    if isinstance(model.optimizer, DeepSpeedZeroOptimizer):
        return Zero12Backend(accelerator, model, optimizer)
    raise SystemExit(f"DeepSpeed chose {type(model.optimizer).__name__}, whose gradient partitions OGPSA cannot "
                     "reach (ZeRO-1 with bf16 and float32 gradient accumulation does this): use ZeRO-2, or set "
                     "data_types.grad_accum_dtype to bf16")


def prepare_reference_model(accelerator, model):
    """A frozen model for DPO: like the policy under DDP; under ZeRO-3 and FSDP2 sharded the same way (each forward
    gathers one layer at a time, never the whole model); under ZeRO-1/2 a full copy in the training precision."""
    from accelerate.utils import DistributedType

    model.requires_grad_(False).eval()
    if accelerator.is_fsdp2:  # sharded as the policy is, by the same Accelerate function and settings
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.prepare_model(model, evaluation_mode=True)
    import deepspeed

    config = {k: v for k, v in accelerator.state.deepspeed_plugin.deepspeed_config.items()
              if k in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "bf16",
                       "zero_optimization")}
    if config["zero_optimization"].get("stage") != 3:
        config["zero_optimization"] = {"stage": 0}
    engine = deepspeed.initialize(model=model, config=config)[0]
    engine.eval()
    return engine


# ---------------------------------------------------------------------------------------------------------------
# Where ZeRO keeps the gradient partition
# ---------------------------------------------------------------------------------------------------------------

class ZeroGradSlice(GradSlice):
    """DeepSpeed ZeRO-1/2: this rank's partition of every parameter group's gradient.

    The local coordinates are DeepSpeed's own partition coordinates: group g's partition (`partition_size[g]`
    entries) follows group g - 1's, and each parameter's piece sits where DeepSpeed's partition tables put it
    (`params_in_partition`, `grad_partition_insertion_offset`, `grad_start_offset`: the tables by which `step()`
    assembles the gradient it clips and steps with). They are also the coordinates of the float32 master partition.
    DeepSpeed's per-parameter `_hp_mapping` is not used: under `round_robin_gradients` (LLaMA-Factory's stock
    ds_z2_config.json) it lists parameters in model order while the partition holds them reordered.

    Where the gradient is between the last backward of a step and `engine.step()`: `averaged_gradients[g]`, a list
    of views that step() concatenates into the partition; under optimizer offload, the float32 partition's `.grad`
    on the CPU, which backward fills and step() reads.
    """

    sharded = True

    def __init__(self, zero_optimizer, params):
        index = {id(p): i for i, p in enumerate(params)}
        self._zero = zero_optimizer
        self.num_params = len(params)
        self.offload = bool(zero_optimizer.cpu_offload)
        self.segments, self.group_starts, start = [], [], 0
        for group, size in enumerate(zero_optimizer.partition_size):
            rank = dist.get_rank(group=zero_optimizer.real_dp_process_group[group])
            for param in zero_optimizer.params_in_partition[group]:
                param_id = zero_optimizer.get_param_id(param)
                source = int(zero_optimizer.grad_start_offset[group][rank][param_id])
                dest = int(zero_optimizer.grad_partition_insertion_offset[group][rank][param_id])
                self.segments.append(Segment(index[id(param)], start + dest,
                                             min(param.numel() - source, int(size) - dest), source))
            self.group_starts.append(start)
            start += int(size)
        masters = zero_optimizer.single_partition_of_fp32_groups
        self.numel, self.device = start, masters[0].device
        self.dtype = masters[0].dtype if self.offload else zero_optimizer.gradient_accumulation_dtype

    def masters(self):
        return list(zip(self.group_starts, self._zero.single_partition_of_fp32_groups))

    def local_values(self, param, segment):
        return param.data.view(-1)[segment.param_start:segment.param_start + segment.length]

    def pieces(self):
        if self.offload:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # backward's copies into the CPU buffers are asynchronous
            return [(start, master.grad) for start, master in self.masters()]
        pieces = []
        for group, start in enumerate(self.group_starts):
            views = self._zero.averaged_gradients.get(group)
            if views is None:
                raise RuntimeError("DeepSpeed holds no reduced gradient for this step: project between the last "
                                   "backward of an optimizer step and engine.step()")
            starts = [start + offset for offset in itertools.accumulate([0] + [v.numel() for v in views[:-1]])]
            pieces += merge_adjacent_views([v.view(-1) for v in views], starts)
        self._check_covered(pieces)
        return pieces

    def _check_covered(self, pieces):
        """Every segment lies inside one view and the views fill the partition, as DeepSpeed's tables say."""
        starts = [start for start, _ in pieces]
        for segment in self.segments:
            i = bisect.bisect_right(starts, segment.start) - 1
            if i < 0 or segment.start + segment.length > starts[i] + pieces[i][1].numel():
                raise RuntimeError(f"DeepSpeed's gradient partition does not hold parameter {segment.param_index} "
                                   "where its partition tables say; the projection would edit the wrong entries")
        if sum(view.numel() for _, view in pieces) != self.numel:
            raise RuntimeError("DeepSpeed's gradient partition is not the size its partition tables give")


class Zero3GradSlice(GradSlice):
    """DeepSpeed ZeRO-3: one contiguous buffer holds this rank's partition of every parameter's gradient.

    Partition r of a parameter covers its flattened entries [r x n, (r + 1) x n), n = `partition_numel()`; the
    last rank's share ends in padding, which stays zero. `engine.step()` reads the clip norm and the update from
    this buffer, so projecting it in place before the step is exact. The buffer's layout is the concatenation of the
    float32 master sub-groups; under optimizer offload step() reads their `.grad` on the CPU instead, which
    backward filled from the buffer.
    """

    sharded = True

    def __init__(self, zero_optimizer, params):
        index = {id(p): i for i, p in enumerate(params)}
        rank = dist.get_rank(group=zero_optimizer.dp_process_group)
        self.num_params = len(params)
        self._zero = zero_optimizer
        self.offload = bool(zero_optimizer.offload_optimizer)
        self.segments, self.group_starts, start = [], [], 0
        for group in zero_optimizer.fp16_groups:
            self.group_starts.append(start)
            for param in group:
                size = param.partition_numel()
                owned = min(size, max(0, param.ds_numel - rank * size))
                if owned:
                    self.segments.append(Segment(index[id(param)], start, owned, rank * size))
                start += size
        self.numel = start
        gradient = (zero_optimizer.fp32_partitioned_groups_flat[0] if self.offload
                    else zero_optimizer.grad_partitions_flat_buffer)
        self.device, self.dtype = gradient.device, gradient.dtype

    def masters(self):
        return list(zip(self.group_starts, self._zero.fp32_partitioned_groups_flat))

    def local_values(self, param, segment):
        return param.ds_tensor.data.view(-1)[:segment.length]

    def pieces(self):
        if self.offload:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return [(start, master.grad) for start, master in self.masters()]
        return [(0, self._zero.grad_partitions_flat_buffer)]


class Fsdp2GradSlice(GradSlice):
    """FSDP2: this rank's rows (a dim-0 shard, possibly uneven or empty) of every trainable parameter's gradient.

    Every parameter's `.grad` is assigned once, before the first backward, as a DTensor whose local shard is a view
    into one flat buffer; FSDP2 then adds each reduced gradient into that shard in place (it replaces a `.grad` only
    when there is none), and clipping and the optimizer read it there. The local coordinates are the shards in
    parameter order, without padding; `param_start` is the shard's offset in the flattened parameter. The masters
    (--base_project_update) are the float32 sharded parameters themselves.
    """

    sharded = True

    def __init__(self, params, param_names):
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        world = dist.get_world_size() if dist.is_initialized() else 1
        for name, param in zip(param_names, params):  # what the all-reduce of partial sums over all ranks assumes
            if not isinstance(param, DTensor):
                raise SystemExit(f"FSDP2 does not shard the trainable parameter {name} (fsdp_ignored_modules?): its "
                                 "gradient is never reduced across ranks; OGPSA needs every trainable parameter "
                                 "sharded, so remove it from the ignored modules")
            if param.device_mesh.ndim != 1 or param.device_mesh.size() != world or \
                    tuple(param.placements) != (Shard(0),):
                raise SystemExit(f"FSDP2 lays out {name} as {tuple(param.placements)} over a mesh of shape "
                                 f"{tuple(param.device_mesh.shape)}: only plain FSDP (dim-0 shards over all "
                                 f"{world} processes) is supported, not HSDP, tensor or context parallelism "
                                 "(Accelerate's parallelism_config)")
        self._params = params
        self.num_params = len(params)
        shards = [p.to_local() for p in params]
        dtypes = {shard.dtype for shard in shards}
        if len(dtypes) != 1:
            raise ValueError(f"all trainable parameters must share one dtype, got {sorted(map(str, dtypes))}")
        self.flat = torch.zeros(sum(shard.numel() for shard in shards), dtype=shards[0].dtype,
                                device=shards[0].device)
        self.segments, self._grad_ptrs, start = [], [], 0
        for index, (param, shard) in enumerate(zip(params, shards)):
            _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            view = self.flat[start:start + shard.numel()].view(shard.shape)
            param.grad = DTensor.from_local(view, param.device_mesh, param.placements, shape=param.shape,
                                            stride=param.stride(), run_check=False)
            if shard.numel():
                self.segments.append(Segment(index, start, shard.numel(),
                                             offset[0] * math.prod(param.shape[1:]) if param.dim() else 0))
            self._grad_ptrs.append(view.data_ptr() if shard.numel() else None)  # an empty shard holds nothing
            start += shard.numel()
        self.numel, self.device, self.dtype = start, self.flat.device, self.flat.dtype

    def pieces(self):
        from torch.distributed.tensor import DTensor

        for index, (param, pointer) in enumerate(zip(self._params, self._grad_ptrs)):
            grad = param.grad
            if not isinstance(grad, DTensor) or (pointer is not None and grad.to_local().data_ptr() != pointer):
                raise RuntimeError(f"FSDP2 replaced the gradient of parameter {index}: the projection would edit "
                                   "memory the optimizer does not read (was the gradient set to None?)")
        return [(0, self.flat)]

    def zero_(self):
        self.flat.zero_()

    def masters(self):
        return [(s.start, self._params[s.param_index].to_local().view(-1)) for s in self.segments]

    def local_values(self, param, segment):
        return param.to_local().view(-1)

    @torch.no_grad()
    def misplaced_params(self, params):
        """Parameters whose gradient shard, as FSDP2 holds it, is not where the coordinates put it: the masters are
        the parameters themselves here, so the map is checked against the gradient views instead of values."""
        misplaced = []
        for segment in self.segments:
            grad = params[segment.param_index].grad.to_local()
            expected = self.flat[segment.start:segment.start + segment.length]
            if grad.data_ptr() != expected.data_ptr() or grad.numel() != segment.length:
                misplaced.append(segment.param_index)
        return misplaced
