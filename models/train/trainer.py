"""The Train stage: the policy's LoRA adapter, continued from the previous round, fitted with a DPO-family loss
against the previous round (algorithm rest: fitted to its supervised examples by their likelihood, loss nll).

    train_round(recipe, parent, pairs, work_dir, out_dir, round_idx, root_model, root_path) -> stats

Words: the *root* is the run's base model as the first round loaded it (`root_model`: how the recipe named
it, `root_path`: where its weights are); the *parent* is the checkpoint a round starts from (round r-1's,
or the base in round 1). train_round is these steps, one function each; `_Replicated` (one process, DDP)
and `_Sharded` (FSDP) hold the only differences between one process and FSDP.

1. `_load_policy`: load the root weights (the run's base model, as loaded: full precision, or nf4 for QLoRA) and the
   policy's LoRA adapter: round r-1's, continued (`parent` is its checkpoint), or a fresh zero adapter
   in round 1 (`parent` is the base). Before any update the model *is* the reference pi_{r-1}. With
   `training.init: base` the adapter is fresh in every round (ReST-EM, STaR) and the parent's is swapped
   in only for the reference pass; a round with nothing to train on keeps its parent's.
2. `_reference_pass`: reference log-probs of every chosen and rejected response, computed once and stored in
   work_dir/ref_logps.parquet, so training holds one model and skips the reference forward. The
   reference (`training.reference`) is the adapter as it is at the round's start (`previous`: the
   model the round continues, as SPIN and SPPO take it), the adapter switched off (`base`: the initial
   model, as RLHFlow's iterative DPO keeps it), or an exponential average of the adapter across
   rounds (`ema`), loaded into the same adapter for the reference pass.
3. `_micro_batches`: length-grouped batches (shuffled groups of similar length, then padded to the longest in the
   batch); chosen and rejected go through the model in one forward, each pair's prompt run once for both
   sides where the model allows it (training.shared_prompt, models/logps.py).
4. `_optimizer`, `_resume`, `_train_steps` (one `_train_step` per optimizer step): AdamW, linear warm-up and
   decay, gradient clipping; checkpoints to work_dir/checkpoint-<step>/ every `save_steps` (adapter, optimiser,
   scheduler, RNG, log), and a killed run resumes from the last.
   A SIGTERM or SIGINT finishes the current step, saves a checkpoint there and stops (common/interrupt.py).
   A NaN or inf loss stops the round with a TrainingError; the last good checkpoint stays.
5. `_export`: the adapter (the policy) and a merged export are written to `out_dir` (models/load/loading.py says how
   the next round loads it).

Runs unchanged under `accelerate launch` (DDP): each process takes its share of every step's
micro-batches, the reference pass is split across processes, the logged figures are averaged over
them, and only the main process writes. With an accelerate config that asks for FSDP (for example
configs/accelerate/fsdp_lora.yaml) the policy is sharded across the processes with FSDP2 instead
(models/train/fsdp.py); the update and the log equal those of one process accumulating the same micro-batches.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from data.layout import TRAINING_LOG
from data.prompts import format_completion, format_prompt
from data.schema import token_ids_or_none, write_parquet
from models.logps import (Encoded, collate, collate_pairs, encode_group, encode_pair, pair_logps, pair_tokens,
                          pairs_share_prompt, sequence_logps)
from models.train.losses import LOSSES, NEEDS_BASE_LOGPS, PreferenceBatch, chosen_nll, completion_nll, implicit_rewards
from common import interrupt
from common.atomic import atomic_path, atomic_write_json
from common.disk import full_disk_guard
from common.errors import Interrupted, TrainingError

log = logging.getLogger("selfplay")
KEEP_CHECKPOINTS = 2
REFERENCE_EMA = "reference_ema.safetensors"  # in a round's checkpoint: the averaged adapter (training.reference: ema)
INTERRUPTED_EXIT = 3  # the exit status of `python -m models.train.trainer` stopped by a signal (tasks/rounds.py)
REFERENCE_FREE = {"simpo", "nll"}


class PolicyLogps(torch.nn.Module):
    """Wraps the policy so DDP/FSDP see one forward: a batch (collate or collate_pairs) in, (summed
    log-probs, token counts) out. `share_prefix` off: every batch runs the decoder the same number of times
    (under FSDP each run gathers weights from every process, so all processes must make the same runs,
    and whether a batch's prompts share a prefix depends on the batch; models.logps.shared_prefix)."""

    def __init__(self, model, share_prefix: bool = True):
        super().__init__()
        self.model = model
        self.share_prefix = share_prefix

    def forward(self, **batch):
        return sequence_logps(self.model, batch, self.share_prefix)


def encode_pairs(tokenizer, pairs: pd.DataFrame, max_length: int, max_prompt_length: int | None = None) -> tuple[list[Encoded], list[Encoded]]:
    """Token ids of every pair; the prompt is cut once per pair, so both sides share it (encode_pair).
    A side the model sampled is scored as the ids it was sampled as (`chosen_token_ids` /
    `rejected_token_ids`), then the template's end of turn: exactly the sequence generated."""
    chosen, rejected = [], []
    column = lambda name: pairs[name].tolist() if name in pairs.columns else [None] * len(pairs)  # noqa: E731
    sides = zip(pairs.prompt, column("system"), pairs.chosen, pairs.rejected, column("chosen_token_ids"),
                column("rejected_token_ids"), column("chosen_finished"), column("rejected_finished"))
    for prompt, system, good, bad, good_sampled, bad_sampled, good_done, bad_done in sides:
        system = system if isinstance(system, str) else None
        good_ids, bad_ids = encode_pair(
            tokenizer, format_prompt(tokenizer, prompt, system), format_completion(tokenizer, prompt, good, system),
            format_completion(tokenizer, prompt, bad, system), max_length, max_prompt_length,
            (_sampled(good, good_sampled, good_done), _sampled(bad, bad_sampled, bad_done)),
        )
        chosen.append(good_ids)
        rejected.append(bad_ids)
    return chosen, rejected


def encode_selected(tokenizer, examples: pd.DataFrame, max_length: int, max_prompt_length: int | None = None) -> list[Encoded]:
    """Token ids of every supervised example (algorithm rest; data/schema.py SELECTED): its `prompt` as the model is
    asked it (a rationalization's hint is not in it), then the response as it was sampled (`token_ids`) and the
    template's end of turn, cut to `max_length` as a pair's sides are (models.logps.truncate_group)."""
    column = lambda name: examples[name].tolist() if name in examples.columns else [None] * len(examples)  # noqa: E731
    encoded = []
    for prompt, system, response, ids, done in zip(examples.prompt, column("system"), examples.response,
                                                    column("token_ids"), column("finished")):
        system = system if isinstance(system, str) else None
        (item,) = encode_group(tokenizer, format_prompt(tokenizer, prompt, system),
                               [format_completion(tokenizer, prompt, response, system)], max_length, max_prompt_length,
                               [_sampled(response, ids, done)])
        encoded.append(item)
    return encoded


def _sampled(text: str, ids, finished) -> tuple[str, list[int]] | None:
    """(text, sampled ids without the EOS a finished sample ends with), or None for a side with no ids."""
    ids = token_ids_or_none(ids)
    if ids is None:
        return None
    finished = finished is not None and finished == finished and bool(finished)  # None/NaN: not recorded
    return text, ids[:-1] if finished and ids else ids


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches by length: little padding, still random order."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _reference_logps(model, tokenizer, chosen, rejected, work_dir: Path, batch_size: int, accelerator,
                     shared_prompt: bool = True, forward=None) -> pd.DataFrame:
    """Reference log-probs: the policy before this round's first update (pi_{r-1}, the root in round 1).

    Cached in work_dir/ref_logps.parquet; computed before a resumed run restores its trained adapter.
    `forward` is the sharded policy's (FSDP, models/train/fsdp.py), None for the model's own.
    """
    path = work_dir / "ref_logps.parquet"
    if not path.is_file():
        rank, world = accelerator.process_index, accelerator.num_processes
        own_pairs = list(range(rank, len(chosen), world))  # the pairs this process scores
        scored = own_pairs
        if forward is not None and chosen:
            # Under FSDP each forward gathers weights from every process, so all run the same number of
            # forwards the same way: shorter shares repeat a pair (its result dropped), and whether prompts
            # are shared is decided on all the pairs, not on a share.
            scored = own_pairs + [own_pairs[-1] if own_pairs else 0] * (math.ceil(len(chosen) / world) - len(own_pairs))
            shared_prompt = shared_prompt and pairs_share_prompt(model, chosen, rejected)
        sums = pair_logps(model, tokenizer, [chosen[i] for i in scored], [rejected[i] for i in scored], batch_size, accelerator.device,
                          shared_prompt, forward)[: len(own_pairs)]
        part = work_dir / f"ref_logps.rank{rank}.json"
        atomic_write_json(part, dict(zip(own_pairs, sums)))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            merged = {}
            for r in range(world):
                merged.update({int(k): v for k, v in json.loads((work_dir / f"ref_logps.rank{r}.json").read_text()).items()})
            frame = pd.DataFrame({"chosen": [merged[i][0] for i in range(len(chosen))], "rejected": [merged[i][1] for i in range(len(chosen))]})
            write_parquet(frame, path)
        accelerator.wait_for_everyone()
    return pd.read_parquet(path)


def _base_logps(model, tokenizer, chosen, rejected, work_dir: Path, batch_size: int, accelerator, parent_is_round: bool,
                ref: pd.DataFrame, shared_prompt: bool = True, forward=None) -> pd.DataFrame:
    """Log-probs under the base model pi_0, for losses that need them beside pi_{r-1}'s (INPO).

    The same load with the LoRA adapter switched off computes with the root weights alone, as Evaluate
    takes pi_base, so no second model is held. In round 1 the adapter is fresh (B = 0) and pi_{r-1} is
    pi_0: the reference log-probs are reused. Cached like the reference pass, in work_dir/base_logps/.
    """
    if not parent_is_round:
        return ref
    from models.load.loading import root_weights

    base_dir = work_dir / "base_logps"
    base_dir.mkdir(exist_ok=True)
    with root_weights(model):
        return _reference_logps(model, tokenizer, chosen, rejected, base_dir, batch_size, accelerator, shared_prompt, forward)


def _base_batch(base: pd.DataFrame | None, idx: list[int], like: torch.Tensor) -> dict:
    """The micro-batch's base log-probs as PreferenceBatch fields (none when the loss needs none)."""
    if base is None:
        return {}
    rows = lambda side: torch.tensor(base[side].to_numpy()[idx], device=like.device, dtype=like.dtype)  # noqa: E731
    return {"base_chosen_logps": rows("chosen"), "base_rejected_logps": rows("rejected")}


PREFERENCE_LOG_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected")


def _preference_values(loss: torch.Tensor, pref: PreferenceBatch) -> dict[str, float]:
    """A micro-batch of pairs: the loss, the implicit rewards (Rafailov et al. 2023, Eq. 5) and the log-probs the log keeps."""
    chosen_reward, rejected_reward = implicit_rewards(pref)
    values = torch.stack([
        loss.detach(), chosen_reward.mean(), rejected_reward.mean(), (chosen_reward > rejected_reward).float().mean(),
        (chosen_reward - rejected_reward).mean(), pref.policy_chosen_logps.detach().mean(),
        pref.policy_rejected_logps.detach().mean(),
    ]).float().tolist()
    return dict(zip(PREFERENCE_LOG_KEYS, values))


def _example_values(loss: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """A micro-batch of supervised examples (loss nll): the per-token NLL and the mean summed log-prob of a response."""
    values = torch.stack([loss.detach(), sums.detach().mean(), counts.float().mean()]).float().tolist()
    return dict(zip(("loss", "logps/response", "tokens/response"), values))


def _latest_checkpoint(work_dir: Path) -> Path | None:
    done = [p for p in work_dir.glob("checkpoint-*") if (p / "state.pt").is_file() and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state: what saving it needs, give or take the pickle around them."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _trainer_state(model, policy, optimizer, fsdp: bool) -> dict:
    """The adapter and optimiser state a trainer checkpoint keeps; under FSDP gathered whole from the
    shards (a collective: every process calls it), with the trainable weights also by parameter name."""
    from peft import get_peft_model_state_dict

    if not fsdp:
        return {"adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict()}
    from models.train.fsdp import full_optimizer_state, full_trainable_state

    trainable = full_trainable_state(model)
    return {"adapter": get_peft_model_state_dict(model, state_dict=trainable), "trainable": trainable,
            "optimizer": full_optimizer_state(policy, optimizer), "fsdp": True}


def _save_trainer_checkpoint(work_dir: Path, step: int, trainer_state: dict, scheduler, history) -> Path:
    final = work_dir / f"checkpoint-{step}"
    state = {
        "step": step,
        **trainer_state,
        "scheduler": scheduler.state_dict(),
        "history": history,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    # A half-written checkpoint must not take space, nor be resumed from. torch.save reports a full disk
    # as a bare RuntimeError: the free space is compared with this estimate.
    with atomic_path(final, directory=True, needed_bytes=_nbytes(state)) as tmp:
        torch.save(state, tmp / "state.pt")
    for old in sorted(work_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_trainer_checkpoint(path: Path) -> dict:
    """A trainer checkpoint's state.pt, unpickled by torch's weights-only loader: tensors and plain Python
    values (what _save_trainer_checkpoint writes), nothing else. round_NN/train_work/ may be on a shared
    filesystem (--shared-run); a full unpickler would run whatever code someone put there on every box
    that resumes."""
    import pickle
    import re

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a reference to {found.group(1).rstrip('.')}" if found else "something else"
        raise TrainingError(
            f"{path} holds {what}, not only tensors and plain values; refusing to unpickle it: delete {path.parent} "
            f"to resume from the checkpoint before it"
        ) from None


def _stop_requested(accelerator) -> bool:
    """Whether a SIGTERM/SIGINT asked to stop, in any process: all ranks must stop after the same step."""
    asked = interrupt.received() is not None
    if accelerator.num_processes == 1:
        return asked
    flag = torch.tensor([1.0 if asked else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class _Replicated:
    """How the round trains with the whole policy in every process: one process, or DDP under `accelerate launch`.
    accelerate accumulates the micro-batches, synchronises the gradients and steps the optimiser where they are
    synchronised. `_Sharded` is the same contract under FSDP; train_round's steps call only these methods."""

    sharded = False

    def __init__(self, accelerator, bf16: bool):
        self.accelerator = accelerator
        self.bf16 = bf16

    @property
    def load_device(self) -> torch.device:
        return self.accelerator.device

    def precision(self):
        """Every pass that stands for the policy runs inside the same autocast (see train_round)."""
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def shard(self, policy: PolicyLogps, model, round_idx: int) -> None:
        """Nothing to shard: every process holds the whole policy."""

    @property
    def reference_forward(self):
        """The forward the reference pass calls (None: the model's own, models.logps.pair_logps)."""
        return None

    def prepare(self, policy, optimizer):
        return self.accelerator.prepare(policy, optimizer)

    def micro_batch(self, policy, last_micro: bool):
        """The context one micro-batch's forward, backward and update run in."""
        return self.accelerator.accumulate(policy)

    def forward(self, policy, batch: dict):
        return policy(**batch)

    def backward(self, loss: torch.Tensor, micro_batches: int) -> None:
        self.accelerator.backward(loss)  # divides by grad_accum_steps itself

    def update(self, optimizer, trainable, max_grad_norm: float, last_micro: bool, grad_norm):
        """Clip and step where accelerate synchronised the gradients; returns the step's gradient norm (else `grad_norm`)."""
        if self.accelerator.sync_gradients:
            grad_norm = self.accelerator.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()  # accelerate's wrapper steps only where the gradients were synchronised
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def saves(self) -> bool:
        """Whether this process takes part in saving a trainer checkpoint."""
        return self.accelerator.is_main_process

    def trainer_state(self, model, policy, optimizer) -> dict:
        return _trainer_state(model, policy, optimizer, fsdp=False)

    def restore(self, state: dict, model, policy, optimizer) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])

    def gather_trained(self, model):
        """The trained weights the export needs (under FSDP a collective); nothing here."""
        return None

    def export_model(self, policy, model, trained, recipe, root_path: str):
        """The model the main process exports: the trained policy itself."""
        return self.accelerator.unwrap_model(policy).model


class _Sharded(_Replicated):
    """FSDP2 across the processes of `accelerate launch` (models/train/fsdp.py): the weights load on the CPU and each
    process keeps its shard; the gradients are reduce-scattered once, after a step's last micro-batch, and every
    process steps its shard. Gathering the state for a checkpoint or the export is a collective."""

    sharded = True

    @property
    def load_device(self) -> torch.device:
        return torch.device("cpu")  # fully_shard moves each process's shard to its device

    def shard(self, policy: PolicyLogps, model, round_idx: int) -> None:
        from models.train.fsdp import shard_policy

        held, whole = shard_policy(policy, model, self.accelerator.device)
        log.info("train round %d: policy sharded with FSDP2 over %d processes; process %d holds %d of its %d weights",
                 round_idx, self.accelerator.num_processes, self.accelerator.process_index, held, whole)
        self.policy = policy

    @property
    def reference_forward(self):
        def forward(batch):
            with self.precision():
                return self.policy(**batch)
        return forward

    def prepare(self, policy, optimizer):
        return policy, optimizer

    def micro_batch(self, policy, last_micro: bool):
        policy.set_requires_gradient_sync(last_micro)  # reduce-scatter (average over processes) after the last only
        return nullcontext()

    def forward(self, policy, batch: dict):
        return self.reference_forward(batch)

    def backward(self, loss: torch.Tensor, micro_batches: int) -> None:
        (loss / micro_batches).backward()  # as accelerator.backward divides by grad_accum_steps (= micro_batches)

    def update(self, optimizer, trainable, max_grad_norm: float, last_micro: bool, grad_norm):
        if last_micro:
            from models.train.fsdp import grad_norm_value

            grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def saves(self) -> bool:
        return True  # every process gathers

    def trainer_state(self, model, policy, optimizer) -> dict:
        return _trainer_state(model, policy, optimizer, fsdp=True)

    def restore(self, state: dict, model, policy, optimizer) -> None:
        from models.train.fsdp import load_trainer_state

        load_trainer_state(policy, model, optimizer, state["trainable"], state["optimizer"])

    def gather_trained(self, model):
        from models.train.fsdp import full_trainable_state

        return full_trainable_state(model)

    def export_model(self, policy, model, trained, recipe, root_path: str):
        """The root loaded again, unsharded on the CPU, with the trained adapter: the export needs the whole model."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        from models.load.loading import add_lora, load_causal_lm

        export = add_lora(load_causal_lm(root_path, recipe.model, device=torch.device("cpu")), recipe.training)
        set_peft_model_state_dict(export, get_peft_model_state_dict(model, state_dict=trained))
        return export


def _parallel(recipe, on_gpu: bool) -> _Replicated:
    """The accelerator, and the object that hides whether the policy is sharded (FSDP) or whole in every process."""
    from accelerate import Accelerator

    from models.train.fsdp import check_fsdp, fsdp_requested
    from models.load.loading import resolve_dtype

    quantized = recipe.model.quantization == "4bit"
    if fsdp_requested():
        check_fsdp(quantized)
    accelerator = Accelerator(cpu=not on_gpu, gradient_accumulation_steps=recipe.training.grad_accum_steps, mixed_precision="no")
    # bf16 (the weights, or QLoRA's compute dtype) trains under bf16 autocast, on a GPU and a CPU alike, and every
    # pass that stands for the policy runs inside the same autocast (`precision`): the training forward,
    # and the reference (and INPO's base) pass, so that at step 0 the policy computes its reference exactly.
    # torch's autocast rather than the accelerator's mixed precision, which is fixed once per process.
    bf16 = resolve_dtype(recipe.model.precision) == torch.bfloat16
    sharded = fsdp_requested() and accelerator.num_processes > 1  # one process has nothing to shard across
    return (_Sharded if sharded else _Replicated)(accelerator, bf16)


@dataclass
class _Policy:
    """Step 1's result: the round's policy (the root with its LoRA adapter) and where it came from."""

    tokenizer: object
    model: object  # the PEFT model
    policy: PolicyLogps  # the model as DDP/FSDP see it
    parent_is_round: bool  # the parent is a round's checkpoint (not the base)
    fresh: bool  # a fresh adapter although the parent has one (training.init: base)
    parent_adapter: dict | None  # the parent's adapter kept aside for the reference pass (when fresh)
    root_path: str
    quantized: bool


def _load_policy(recipe, parent: str, pairs: pd.DataFrame, root_path: str | None, parallel: _Replicated,
                 round_idx: int) -> _Policy:
    """Step 1: the root weights and the policy's adapter (continued from the parent's, or fresh)."""
    from models.load.loading import add_lora, checkpoint_info, is_round_checkpoint, load_causal_lm, load_tokenizer, round_adapter, saved_adapter

    cfg = recipe.training
    quantized = recipe.model.quantization == "4bit"
    parent_is_round = is_round_checkpoint(parent)
    # training.init base: a fresh adapter on the root (ReST-EM, STaR), the parent's adapter kept aside for the
    # reference; with nothing to train on, the round keeps its parent's policy whatever the init.
    fresh = cfg.init == "base" and parent_is_round and len(pairs) > 0
    root_path = root_path or (checkpoint_info(parent)["root_path"] if parent_is_round else parent)
    tokenizer = load_tokenizer(parent, recipe.model)
    tokenizer.padding_side = "right"
    model = load_causal_lm(root_path, recipe.model, device=parallel.load_device, quantize=quantized)
    model = add_lora(model, cfg, quantized=quantized, adapter_dir=round_adapter(parent) if parent_is_round and not fresh else None)
    parent_adapter = saved_adapter(model, round_adapter(parent), cfg) if fresh else None
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    policy = PolicyLogps(model, share_prefix=not parallel.sharded)
    parallel.shard(policy, model, round_idx)
    return _Policy(tokenizer, model, policy, parent_is_round, fresh, parent_adapter, root_path, quantized)


def _encode(tokenizer, pairs: pd.DataFrame, recipe) -> tuple[list[Encoded], list[Encoded] | None]:
    """Token ids of the round's pairs (chosen, rejected), or of its supervised examples (examples, None: loss nll)."""
    cfg = recipe.training
    if recipe.loss == "nll":  # algorithm rest: supervised examples, no rejected side
        return encode_selected(tokenizer, pairs, cfg.max_length, recipe.prompt_token_limit), None
    return encode_pairs(tokenizer, pairs, cfg.max_length, recipe.prompt_token_limit)


@dataclass
class _Reference:
    """Step 2's result: the log-probs the loss compares the policy with."""

    ref: pd.DataFrame  # the reference's summed log-probs, columns chosen, rejected
    base: pd.DataFrame | None  # the base model's, for losses that need them (INPO)
    ema_start: dict | None  # the averaged adapter the reference was (training.reference: ema)
    seconds: float


def _reference_pass(recipe, parent: str, setup: _Policy, chosen, rejected, work_dir: Path, parallel: _Replicated) -> _Reference:
    """Step 2: the reference's (and INPO's base model's) log-probs of every pair, computed once and cached."""
    cfg, loss_name, model = recipe.training, recipe.loss, setup.model
    start = time.perf_counter()
    if cfg.reference == "ema" and parallel.sharded:
        raise TrainingError("training.reference: ema is not supported under FSDP; use previous or base")
    if setup.parent_adapter is not None and parallel.sharded and cfg.reference == "previous" and loss_name not in REFERENCE_FREE:
        # The parent's adapter would be swapped into a sharded policy for the reference pass, as ema's average is.
        raise TrainingError("training.init: base with training.reference: previous is not supported under FSDP; "
                            "use reference base (the fresh adapter's start), or init previous")
    ema_start = _parent_ema(parent, model) if cfg.reference == "ema" else None
    args = (setup.tokenizer, chosen, rejected)
    with parallel.precision():  # a reference computed in another precision than the policy's differs from it at step 0
        if loss_name in REFERENCE_FREE:
            ref = pd.DataFrame({"chosen": [0.0] * len(chosen), "rejected": [0.0] * len(chosen)})
        else:
            with _reference_model(model, cfg.reference, ema_start, setup.parent_adapter):
                ref = _reference_logps(model, *args, work_dir, cfg.batch_size, parallel.accelerator, cfg.shared_prompt,
                                       parallel.reference_forward)
        base = None
        if loss_name in NEEDS_BASE_LOGPS:
            base = _base_logps(model, *args, work_dir, cfg.batch_size, parallel.accelerator, setup.parent_is_round, ref,
                               cfg.shared_prompt, parallel.reference_forward)
    return _Reference(ref, base, ema_start, time.perf_counter() - start)


@dataclass
class _Schedule:
    """How many optimizer steps the round makes, of how many micro-batches each."""

    batches_per_epoch: int
    per_step: int  # micro-batches per optimizer step, over all processes
    total_steps: int


def _schedule(cfg, examples: int, num_processes: int) -> _Schedule:
    batches_per_epoch = math.ceil(examples / cfg.batch_size)
    per_step = cfg.grad_accum_steps * num_processes
    return _Schedule(batches_per_epoch, per_step, math.ceil(cfg.epochs * batches_per_epoch / per_step))


def _micro_batches(chosen, rejected, cfg, schedule: _Schedule, seed: int, round_idx: int) -> list[list[int]]:
    """Step 3: length-grouped micro-batches of example indices, a new shuffle every epoch, enough for every step."""
    lengths = [len(c) for c in chosen] if rejected is None else [max(len(c), len(r)) for c, r in zip(chosen, rejected)]
    micro_batches: list[list[int]] = []
    epoch = 0
    while len(micro_batches) < schedule.total_steps * schedule.per_step:
        micro_batches += length_grouped_batches(lengths, cfg.batch_size, seed=seed * 997 + round_idx * 31 + epoch)
        epoch += 1
    return micro_batches


def _optimizer(cfg, model, total_steps: int):
    """Step 4's optimiser: AdamW on the trainable (LoRA) weights, linear warm-up, then linear decay to 0."""
    warmup = int(cfg.warmup_ratio * total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]  # under FSDP: the shards (after shard_policy)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
    )
    return trainable, optimizer, scheduler


def _resume(work_dir: Path, setup: _Policy, policy, optimizer, scheduler, parallel: _Replicated, round_idx: int,
            total_steps: int) -> tuple[int, list[dict]]:
    """The step and log to go on from: the last trainer checkpoint's, restored into the adapter, the optimiser,
    the scheduler and the random generators; (0, []) when there is none."""
    resume = _latest_checkpoint(work_dir)
    if resume is None:
        return 0, []
    state = _load_trainer_checkpoint(resume / "state.pt")
    if state.get("fsdp", False) != parallel.sharded:
        raise TrainingError(
            f"trainer checkpoint {resume} was written {'with' if state.get('fsdp') else 'without'} FSDP; resume it under "
            f"the accelerate config it was written with, or delete {work_dir} to start the round again"
        )
    parallel.restore(state, setup.model, policy, optimizer)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    log.info("train round %d: resuming from %s (step %d of %d)", round_idx, resume, state["step"], total_steps)
    return state["step"], state["history"]


@dataclass
class _Loop:
    """What every training step reads: the encoded examples, their reference log-probs and the optimiser."""

    recipe: object
    tokenizer: object
    chosen: list
    rejected: list | None  # None: supervised examples (loss nll)
    reference: _Reference
    chosen_win: torch.Tensor | None  # SPPO's estimated win probabilities of each side
    rejected_win: torch.Tensor | None
    shared_prompt: bool
    policy: object
    trainable: list
    optimizer: object
    scheduler: object
    parallel: _Replicated


def _micro_loss(loop: _Loop, idx: list[int], batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's loss (the algorithm's, or the supervised examples' NLL) and its logged values."""
    cfg, recipe = loop.recipe.training, loop.recipe
    with loop.parallel.precision():
        sums, counts = loop.parallel.forward(loop.policy, batch)
    if loop.rejected is None:
        loss = completion_nll(sums, counts.float()).mean()
        return loss, _example_values(loss, sums, counts)
    n, ref = len(idx), loop.reference.ref
    pref = PreferenceBatch(
        policy_chosen_logps=sums[:n], policy_rejected_logps=sums[n:],
        ref_chosen_logps=torch.tensor(ref.chosen.to_numpy()[idx], device=sums.device, dtype=sums.dtype),
        ref_rejected_logps=torch.tensor(ref.rejected.to_numpy()[idx], device=sums.device, dtype=sums.dtype),
        beta=cfg.beta,
        chosen_win_prob=loop.chosen_win[idx].to(sums.device) if loop.chosen_win is not None else None,
        rejected_win_prob=loop.rejected_win[idx].to(sums.device) if loop.rejected_win is not None else None,
        chosen_lengths=counts[:n].float(), rejected_lengths=counts[n:].float(),
        label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
        inpo_eta=recipe.inpo_eta_tau[0], inpo_tau=recipe.inpo_eta_tau[1], **_base_batch(loop.reference.base, idx, sums),
    )
    loss = LOSSES[recipe.loss](pref)
    if cfg.nll_weight:
        loss = loss + cfg.nll_weight * chosen_nll(pref)
    loss = loss.mean()
    return loss, _preference_values(loss, pref)


def _collate(loop: _Loop, idx: list[int]) -> dict:
    pad = loop.tokenizer.pad_token_id
    if loop.rejected is None:
        return collate([loop.chosen[i] for i in idx], pad)
    if loop.shared_prompt:
        return collate_pairs([loop.chosen[i] for i in idx], [loop.rejected[i] for i in idx], pad)
    return collate([loop.chosen[i] for i in idx] + [loop.rejected[i] for i in idx], pad)


def _train_step(loop: _Loop, step_batches: list[list[int]], step: int, round_idx: int, work_dir: Path, grad_norm):
    """One optimizer step over this process's share of the step's micro-batches: forward, backward and update
    each; returns the step's log entry (this process's means, tokens) and the gradient norm."""
    parallel = loop.parallel
    accelerator = parallel.accelerator
    own_batches = step_batches[accelerator.process_index :: accelerator.num_processes]
    micro_values = []
    step_start, tokens, tokens_run = time.perf_counter(), 0, 0
    for micro, idx in enumerate(own_batches):
        last_micro = micro == len(own_batches) - 1
        with parallel.micro_batch(loop.policy, last_micro):
            batch = _collate(loop, idx)
            batch_tokens, batch_run = pair_tokens(batch)
            tokens, tokens_run = tokens + batch_tokens, tokens_run + batch_run
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            loss, values = _micro_loss(loop, idx, batch)
            parallel.backward(loss, len(own_batches))
            # One host sync per micro-batch (the values), before the weights change.
            if not math.isfinite(values["loss"]):
                last = _latest_checkpoint(work_dir)
                raise TrainingError(
                    f"round {round_idx}: training loss became {values['loss']} at step {step + 1}; "
                    f"last good trainer checkpoint: {last or 'none yet'}; lower training.learning_rate or check the pairs"
                )
            grad_norm = parallel.update(loop.optimizer, loop.trainable, loop.recipe.training.max_grad_norm, last_micro, grad_norm)
            micro_values.append(values)
    step_log = {key: sum(v[key] for v in micro_values) / len(micro_values) for key in micro_values[0]}
    return step_log, tokens, tokens_run, time.perf_counter() - step_start, grad_norm


def _mean_over_processes(accelerator, step_log: dict, tokens: int, tokens_run: int) -> tuple[dict, int, int]:
    """Every process ran as many micro-batches: the mean of the processes' means is the step's mean; tokens add up."""
    if accelerator.num_processes == 1:
        return step_log, tokens, tokens_run
    names = list(step_log)
    shared = torch.tensor([step_log[key] for key in names] + [tokens, tokens_run], dtype=torch.float64, device=accelerator.device)
    shared = accelerator.reduce(shared, reduction="sum").tolist()
    step_log = {key: value / accelerator.num_processes for key, value in zip(names, shared)}
    return step_log, int(shared[-2]), int(shared[-1])


def _train_steps(loop: _Loop, schedule: _Schedule, micro_batches, step: int, history: list[dict], setup: _Policy,
                 work_dir: Path, round_idx: int, on_step) -> list[dict]:
    """Step 4's loop: the optimizer steps from `step` to the last, a trainer checkpoint every save_steps (and at a
    SIGTERM/SIGINT, which then stops the round with Interrupted); returns the log, one entry per step."""
    from common.progress import bar

    cfg, parallel = loop.recipe.training, loop.parallel
    accelerator, total_steps, per_step = parallel.accelerator, schedule.total_steps, schedule.per_step
    loop.policy.train()
    progress = bar(total=total_steps, initial=step, desc=f"train round {round_idx}", disable=not accelerator.is_main_process)
    # From here a SIGTERM/SIGINT lets the current step finish, saves a trainer checkpoint and stops (below).
    interrupt.enter_safe_points("training step")
    grad_norm = None
    while step < total_steps:
        step_log, tokens, tokens_run, seconds, grad_norm = _train_step(
            loop, micro_batches[step * per_step : (step + 1) * per_step], step, round_idx, work_dir, grad_norm)
        loop.scheduler.step()
        step += 1
        step_log, tokens, tokens_run = _mean_over_processes(accelerator, step_log, tokens, tokens_run)
        step_log.update(step=step, epoch=step * per_step / schedule.batches_per_epoch, learning_rate=loop.scheduler.get_last_lr()[0],
                     grad_norm=float(grad_norm), seconds=seconds, tokens=tokens, tokens_run=tokens_run)
        history.append(step_log)
        if on_step is not None and accelerator.is_main_process:
            on_step(history)
        progress.update(1)
        shown = {"loss": f"{step_log['loss']:.4f}"} | ({"acc": f"{step_log['rewards/accuracy']:.2f}"} if "rewards/accuracy" in step_log else {})
        progress.set_postfix(**shown, refresh=False)
        stop = step < total_steps and _stop_requested(accelerator)
        if (stop or step % cfg.save_steps == 0 or step == total_steps) and parallel.saves():
            trainer_state = parallel.trainer_state(setup.model, loop.policy, loop.optimizer)  # under FSDP every process gathers
            if accelerator.is_main_process:
                _save_trainer_checkpoint(work_dir, step, trainer_state, loop.scheduler, history)
        if stop:
            accelerator.wait_for_everyone()
            raise Interrupted(
                f"{interrupt.received() or 'a signal'}: training of round {round_idx} stopped after step {step} of "
                f"{total_steps}; trainer checkpoint {work_dir / f'checkpoint-{step}'}; rerun the same command to resume"
            )
    interrupt.leave_safe_points()
    progress.close()
    return history


def _round_stats(recipe, pairs: pd.DataFrame, setup: _Policy, reference: _Reference, schedule: _Schedule,
                 shared_prompt: bool, history: list[dict], round_idx: int, parent_round: int | None,
                 supervised: bool) -> dict:
    """The round's training figures (metrics.json's `train`, training_log.json's `stats`)."""
    cfg = recipe.training
    timed = history[1:] or history  # the first step includes warm-up (allocation, kernel selection)
    return {
        "examples" if supervised else "pairs": len(pairs),
        "steps": schedule.total_steps,
        "trained": schedule.total_steps > 0,
        "init": cfg.init,
        "adapter_start": "parent" if setup.parent_is_round and not setup.fresh else "fresh",
        "reference_seconds": reference.seconds,
        "shared_prompt": shared_prompt,
        "train_tokens_per_second": sum(h["tokens"] for h in timed) / max(1e-9, sum(h["seconds"] for h in timed)) if timed else None,
        "parent_round": round_idx - 1 if parent_round is None else parent_round,
        "reference": cfg.reference,
        "loss": recipe.loss,
        "beta": cfg.beta,
        "learning_rate": cfg.learning_rate,
        "final_loss": history[-1]["loss"] if history else None,
        "final_reward_accuracy": history[-1].get("rewards/accuracy") if history else None,
    }


def _export(recipe, setup: _Policy, policy, parallel: _Replicated, reference: _Reference, stats: dict, history: list[dict],
            parent: str, root_model: str, out_dir: Path, round_idx: int) -> None:
    """Step 5: the adapter, a merged export (training.save_merged), the averaged reference and the log, into out_dir."""
    from peft import get_peft_model_state_dict

    from models.load.loading import save_checkpoint

    trained = parallel.gather_trained(setup.model)  # under FSDP a collective: every process gathers
    if parallel.accelerator.is_main_process:
        export = parallel.export_model(policy, setup.model, trained, recipe, setup.root_path)
        # Before saving, which folds the adapter into the weights of a full-precision export.
        trained_adapter = get_peft_model_state_dict(export) if reference.ema_start is not None else None
        # What saving needs: the merged weights (about the model's own size) or the adapter alone.
        save_merged = recipe.training.save_merged
        needed = _nbytes(export.state_dict()) if save_merged else _nbytes(get_peft_model_state_dict(export))
        with full_disk_guard(out_dir, needed):
            save_checkpoint(
                export, setup.tokenizer, out_dir, parent=parent, root_model=root_model, root_path=setup.root_path,
                round_idx=round_idx, model_cfg=recipe.model, save_merged=save_merged, quantized=setup.quantized,
            )
        if reference.ema_start is not None:
            _save_ema(out_dir / REFERENCE_EMA, reference.ema_start, trained_adapter, recipe.reference_ema)
        atomic_write_json(out_dir / TRAINING_LOG, {"stats": stats, "history": history})
    parallel.accelerator.wait_for_everyone()


def train_round(recipe, parent: str, pairs: pd.DataFrame, work_dir, out_dir, round_idx: int, root_model: str,
                root_path: str | None = None, on_step=None, parent_round: int | None = None) -> dict:
    """One round's training, as the module docstring's five steps; returns the round's training figures.

    `on_step(history)`: called on the main process after each step with the round's log so far, one entry
    per step, those restored from a trainer checkpoint included (an experiment tracker, data/tracking.py)."""
    cfg = recipe.training
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    parallel = _parallel(recipe, on_gpu=torch.cuda.is_available())
    torch.manual_seed(recipe.seed + round_idx)
    setup = _load_policy(recipe, parent, pairs, root_path, parallel, round_idx)  # 1
    chosen, rejected = _encode(setup.tokenizer, pairs, recipe)
    reference = _reference_pass(recipe, parent, setup, chosen, rejected, work_dir, parallel)  # 2
    schedule = _schedule(cfg, len(pairs), parallel.accelerator.num_processes)
    if schedule.total_steps == 0:
        log.warning("train round %d: %s; the round trains nothing and its policy equals its parent's", round_idx,
                    "no example passed the judge" if rejected is None else "no preference pairs")
    trainable, optimizer, scheduler = _optimizer(cfg, setup.model, schedule.total_steps)  # 4
    policy, optimizer = parallel.prepare(setup.policy, optimizer)
    step, history = _resume(work_dir, setup, policy, optimizer, scheduler, parallel, round_idx, schedule.total_steps)
    micro_batches = _micro_batches(chosen, rejected, cfg, schedule, recipe.seed, round_idx)  # 3
    # Each pair's prompt runs once for both sides where the model allows (models.logps.shares_prompt).
    shared_prompt = rejected is not None and cfg.shared_prompt and pairs_share_prompt(setup.model, chosen, rejected)
    win = lambda side: torch.tensor(pairs[side].to_numpy(float)) if side in pairs else None  # noqa: E731
    loop = _Loop(recipe, setup.tokenizer, chosen, rejected, reference, win("chosen_win_prob"), win("rejected_win_prob"),
                 shared_prompt, policy, trainable, optimizer, scheduler, parallel)
    history = _train_steps(loop, schedule, micro_batches, step, history, setup, work_dir, round_idx, on_step)
    stats = _round_stats(recipe, pairs, setup, reference, schedule, shared_prompt, history, round_idx, parent_round,
                         supervised=rejected is None)
    _export(recipe, setup, policy, parallel, reference, stats, history, parent, root_model, out_dir, round_idx)  # 5
    return stats


def _parent_ema(parent: str, model) -> dict:
    """The averaged adapter the round's reference is (training.reference: ema): the one the parent round saved,
    else the adapter the round starts from (round 1's fresh adapter is the base; a parent trained without
    an average starts one at its own adapter)."""
    from peft import get_peft_model_state_dict

    start_adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    path = Path(parent) / REFERENCE_EMA
    if not path.is_file():
        return start_adapter
    from safetensors.torch import load_file

    saved = load_file(path)
    if set(saved) != set(start_adapter):
        raise TrainingError(f"{path} does not fit this round's adapter (training.lora_target_modules changed?)")
    return {k: saved[k].to(start_adapter[k].device, start_adapter[k].dtype) for k in start_adapter}


@contextmanager
def _reference_model(model, reference: str, ema: dict | None, parent_adapter: dict | None = None):
    """Inside the block `model` is the round's reference: the model the round continues (previous: as it is, or,
    when the round starts a fresh adapter (training.init base), with `parent_adapter` swapped in), its adapter
    switched off (base), or its adapter replaced by the averaged one (ema); the adapter is put back after."""
    from models.load.loading import adapter_is_zero, root_weights

    swap = ema if reference == "ema" else parent_adapter if reference == "previous" else None
    if reference == "base":
        with root_weights(model):
            yield model
    elif swap is None:
        # A fresh adapter (round 1 from the base) adds exactly zero: the root weights give the same log-probs bit
        # for bit, and skipping the adapter's matmuls makes the pass about a fifth faster on a CPU (bench/README.md).
        with root_weights(model) if adapter_is_zero(model) else nullcontext():
            yield model
    else:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        own = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        set_peft_model_state_dict(model, {k: swap[k].to(own[k].device, own[k].dtype) for k in own})
        try:
            yield model
        finally:
            set_peft_model_state_dict(model, own)


def _save_ema(path: Path, ema_before: dict, trained: dict, keep: float) -> None:
    """The average after this round, parameter by parameter: keep * average before + (1 - keep) * trained
    adapter. TR-DPO's soft update of the reference (Gorbatovski et al. 2024, arXiv:2404.09656, Sec. 3:
    pi_ref <- alpha pi_theta + (1 - alpha) pi_ref_prev, on the weights), taken once per round on the adapter."""
    from safetensors.torch import save_file

    averaged = {k: (keep * ema_before[k].float().cpu() + (1 - keep) * trained[k].detach().float().cpu()).contiguous()
                for k in trained}
    save_file(averaged, str(path))


def run_job(job: dict) -> dict:
    """Entry used by the Train task in-process and by `accelerate launch -m models.train.trainer job.json`.

    `pair_files`: [path, share, source round] per pairs file (selected.parquet for algorithm rest), this round's
    first (share 1); an earlier round's share is a fixed random subset (training.mix_rounds, data.selection.mixed_share)."""
    from configs.recipe import recipe_from_dict
    from data.schema import PAIRS, SELECTED, read_artifact
    from data.selection import mixed_share

    from data.tracking import step_logger

    recipe = recipe_from_dict(job["recipe"], "train job")
    schema = SELECTED if recipe.algorithm == "rest" else PAIRS  # rest trains on selected.parquet's examples
    frames = [mixed_share(read_artifact(path, schema), share, (recipe.seed, job["round_idx"], source))
              for path, share, source in job["pair_files"]]
    pairs = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    on_step = step_logger(recipe, job.get("run_dir"), job["round_idx"])  # None without trackers
    try:
        return train_round(recipe, job["parent"], pairs, job["work_dir"], job["out_dir"], job["round_idx"], job["root_model"],
                           job.get("root_path"), on_step, job.get("parent_round"))
    finally:
        if on_step is not None:
            on_step.close()


if __name__ == "__main__":
    import sys

    from common.quiet import quiet_library_noise

    logging.basicConfig(level=logging.INFO, format="selfplay: %(message)s")
    quiet_library_noise()
    # Under `accelerate launch` the Train task passes its signals on to this process group; a process may get
    # the same signal twice (from the task and from accelerate), so a repeat must not skip the checkpoint.
    interrupt.install(repeat_stops_at_once=False)
    try:
        run_job(json.loads(Path(sys.argv[1]).read_text()))
    except Interrupted as exc:
        logging.getLogger("selfplay").error("%s", exc)
        sys.exit(INTERRUPTED_EXIT)
