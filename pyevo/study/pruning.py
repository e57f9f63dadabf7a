"""Structural-pruning baselines of the evidence study: uniform width and Diff-Pruning.

Both remove whole channels from a copy of the teacher (a diffusers ``UNet2DModel``) through
torch-pruning's dependency graph, which couples every channel with the layers that read or add it
(residual sums, skip concatenations, the time embedding's projections), so that what remains is a
smaller dense UNet. Both keep the same share of every coupled group of channels (torch-pruning's local,
per-layer pruning, not global ranking); they differ in how a group ranks its channels:

- **uniform width** (``importance="magnitude"``): the group's L1 magnitude (``MagnitudeImportance(p=1)``:
  the mean over the group's convolutions and linears of the L1 norm of the weights that write or read
  the channel);
- **Diff-Pruning** (``importance="diff-pruning"``; Fang et al. 2023, "Structural Pruning for Diffusion
  Models"): first-order Taylor importance ``sum |w * dL/dw|`` (``TaylorImportance``, not multivariable:
  the paper's estimate of the accumulated error of removing each weight) from gradients of the diffusion
  loss accumulated over timesteps t = 0, 1, 2, ... : each step one fixed batch of training images with
  one fixed noise, all at the same t, loss = the MSE of the prediction against the true target of the
  scheduler's prediction type; accumulation stops after the first t whose loss is below ``threshold``
  (0.05) x the largest loss so far. This is the paper's restriction of the importance to the early,
  low-noise timesteps: the later steps' losses are small, and their gradients would mostly add noise to
  the estimate. As in the authors' code, the stopping step's gradient is included.

The share kept is found by a search over the shares the channel granularity allows, so that the pruned
model's batch-1 MACs (:func:`pyevo.cost.count_macs`) are as close as possible to ``target_macs`` x the
teacher's; ``info`` says how close, and which achievable ratios lie on either side of the target.

Structure kept valid: ``conv_in``'s input, ``conv_out``'s output and the sinusoidal time embedding stay
whole; every channel group of a GroupNorm loses the same positions (torch-pruning's channel groups), so
each norm keeps its number of groups, the channels per group stay whole numbers, and each pruned group is a
subset of the teacher's one, except in a norm over a skip concatenation whose groups straddle its two parts
(the digits teacher's 64 + 32 channels in 8 groups of 12), whose groups then mix the parts in other
proportions than the teacher's; an attention layer keeps its number of heads and every head loses the same
positions (head dims, not heads: a uniform share even for DDPM's single-head attention), and its query
projection is scaled by sqrt(d'/d), so that the scores SDPA computes at the pruned head dim d',
q'.k / sqrt(d'), are the teacher's q.k / sqrt(d) over the kept dims (the teacher's softmax temperature). Diffusers' cached widths (``Downsample2D.channels``,
``ResnetBlock2D.in_channels``, ``Attention.inner_dim`` and friends) are re-read from the weights' shapes.
The model's ``config`` stays the teacher's: a ``UNet2DModel`` config has one width per block and ties the
sinusoidal embedding's width to ``block_out_channels[0]``, so it cannot describe the pruned widths (a
resnet's inner width, attention head dims, the time embedding's width).

Saving (:func:`save_pruned` / :func:`load_pruned`) is therefore not diffusers' ``save_pretrained``: one
safetensors file holds the pruned weights, whose shapes are the pruned structure, and in its metadata the
teacher's UNet2DModel config; loading builds that UNet without weights and gives every layer the stored
tensor, then re-reads the cached widths, so the round trip is bit-exact.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from pyevo.cost import count_macs, count_params
from pyevo.diffusion import ImageSet, training_target
from pyevo.runfolder import atomic_write_bytes
from pyevo.teacher import conditioning, model_device, probe_labels, sample_shape

log = logging.getLogger(__name__)

IMPORTANCES = ("magnitude", "diff-pruning")
WEIGHTS_FILE = "pruned_unet.safetensors"
FORMAT = "pyevo-pruned-unet"
FORMAT_VERSION = "1"
# torch-pruning keeps int(channels_per_group x (1 - pruning_ratio)) channels; the pruning ratio is
# lowered by this much so that a share k / c that rounds down in floating point still keeps k of c.
_SHARE_SLACK = 1e-9


def prune_unet(teacher: nn.Module, target_macs: float, importance: str, data: ImageSet, scheduler,
               seed: int, batch_size: int = 32, threshold: float = 0.05) -> tuple[nn.Module, dict]:
    """A pruned deep copy of ``teacher`` (teacher untouched) whose batch-1 MACs are as close as the channel
    granularity allows to ``target_macs`` x the teacher's (importance: ``"magnitude"`` = uniform width, or
    ``"diff-pruning"``).

    Returns (model in eval mode, its parameters trainable, info) with info = {"importance", "channel_ratio"
    (the share of every group's channels kept, per group of a GroupNorm or head), "kept_channels" (the share
    of all prunable channels kept), "target_macs", "macs_ratio", "macs_error" (achieved - target),
    "macs_ratio_below" / "macs_ratio_above" (the nearest achievable ratios at or below / above the target;
    None past the ends), "params_ratio", "macs", "teacher_macs", "params", "teacher_params", "timesteps"
    (Diff-Pruning: [first, last] timestep whose gradients were accumulated, inclusive; None for magnitude),
    "timestep_losses" (Diff-Pruning: the loss at each of those timesteps), "threshold", "seed",
    "batch_size", "seconds"}. Deterministic given ``seed`` (it draws Diff-Pruning's batch and noise).
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; pyevo's pruning baselines are {', '.join(IMPORTANCES)}")
    if not 0.0 < target_macs <= 1.0:
        raise ValueError(f"target_macs must be in (0, 1] (a share of the teacher's MACs), got {target_macs}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1) (a share of the largest loss), got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not isinstance(teacher, UNet2DModel):
        raise ValueError(f"pyevo prunes diffusers UNet2DModels; got a {type(teacher).__name__}")
    started = time.perf_counter()
    teacher_macs, teacher_params = batch1_macs(teacher), count_params(teacher)
    # The copy the importance is read from: Diff-Pruning's gradients accumulate on it, never on the teacher.
    scored = copy.deepcopy(teacher).eval().requires_grad_(True)
    info: dict = {"importance": importance, "target_macs": target_macs, "seed": seed, "batch_size": batch_size,
                  "threshold": threshold if importance == "diff-pruning" else None,
                  "timesteps": None, "timestep_losses": None}
    if importance == "diff-pruning":
        info.update(accumulate_diffusion_gradients(scored, data, scheduler, seed, batch_size, threshold))

    shares = achievable_shares(scored)
    pruned: dict[int, tuple[nn.Module, int, int]] = {}  # share index -> (model, MACs, params)

    def macs_at(index: int) -> int:
        if index not in pruned:
            model = prune_to_share(scored, shares[index], importance)
            pruned[index] = (model, batch1_macs(model), count_params(model))
            log.debug("share %.4f: MACs ratio %.4f", shares[index], pruned[index][1] / teacher_macs)
        return pruned[index][1]

    # MACs never fall as the share grows. Bisect with below < above, MACs(below) <= goal < MACs(above)
    # (-1 and len(shares) stand for "none"); only the two bracketing models are kept.
    goal = target_macs * teacher_macs
    below, above = -1, len(shares) - 1
    if macs_at(above) <= goal:
        below, above = above, len(shares)
    while above - below > 1:
        middle = (below + above) // 2
        if macs_at(middle) <= goal:
            below = middle
        else:
            above = middle
        for index in [i for i in pruned if i not in (below, above)]:
            del pruned[index]
    ends = [i for i in (below, above) if 0 <= i < len(shares)]
    best = min(ends, key=lambda i: (abs(pruned[i][1] - goal), pruned[i][1]))
    model, macs, params = pruned[best]
    share = shares[best]
    ratio_at = {i: pruned[i][1] / teacher_macs for i in ends}
    del scored, pruned
    info.update({
        "channel_ratio": share, "kept_channels": _prunable_channels(model) / _prunable_channels(teacher),
        "macs_ratio": macs / teacher_macs, "macs_error": macs / teacher_macs - target_macs,
        "macs_ratio_below": ratio_at.get(below), "macs_ratio_above": ratio_at.get(above),
        "params_ratio": params / teacher_params, "macs": macs, "teacher_macs": teacher_macs, "params": params,
        "teacher_params": teacher_params, "seconds": time.perf_counter() - started})
    if below < 0:
        log.warning("target MACs %.3f is below the smallest this teacher's channel groups allow (%.3f: one channel "
                    "per group)", target_macs, info["macs_ratio"])
    log.info("%s pruning: %.3f of every group's channels kept, MACs %.3f of the teacher's (target %.3f), "
             "params %.3f, in %.1f s", importance, share, info["macs_ratio"], target_macs, info["params_ratio"],
             info["seconds"])
    return model, info


def accumulate_diffusion_gradients(model: nn.Module, data: ImageSet, scheduler, seed: int, batch_size: int = 32,
                                   threshold: float = 0.05) -> dict:
    """Diff-Pruning's gradients, accumulated into ``model``'s ``.grad`` (zeroed first): one batch of
    ``batch_size`` training images (drawn without replacement) and one noise, both fixed, noised at
    t = 0, 1, 2, ... in turn (every image at the same t); each step backpropagates the MSE of the
    prediction against the true target of the scheduler's prediction type, and the loop stops after the
    first step whose loss is below ``threshold`` x the largest loss so far (or at the last timestep).

    Returns {"timesteps": [0, last] (inclusive), "timestep_losses": the loss at each, "largest_loss"}."""
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=generator)[:batch_size]
    clean = data.images[index]
    noise = torch.randn(clean.shape, generator=generator)
    labels = None if data.labels is None else data.labels[index].to(device)
    clean, noise = clean.to(device), noise.to(device)
    model.zero_grad(set_to_none=True)
    losses: list[float] = []
    largest = 0.0
    for step in range(scheduler.config.num_train_timesteps):
        timesteps = torch.full((len(clean),), step, dtype=torch.long, device=device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        target = training_target(scheduler, clean, noise, timesteps)
        with torch.enable_grad():
            prediction = model(noisy, timesteps, **conditioning(model, labels)).sample
            loss = F.mse_loss(prediction.float(), target.float())
        loss.backward()
        losses.append(float(loss.detach()))
        largest = max(largest, losses[-1])
        if losses[-1] < threshold * largest:
            break
    log.info("Diff-Pruning: gradients of timesteps 0-%d accumulated (loss %.4g, below %.3g x the largest %.4g)",
             len(losses) - 1, losses[-1], threshold, largest)
    return {"timesteps": [0, len(losses) - 1], "timestep_losses": losses, "largest_loss": largest}


def prune_to_share(scored: nn.Module, share: float, importance: str) -> nn.Module:
    """A pruned deep copy of ``scored`` that keeps ``share`` (in (0, 1]) of the channels of every coupled
    group, per GroupNorm group and per attention head (torch-pruning keeps int(share x channels per
    group)), ranked by ``importance``: ``"magnitude"`` (L1) or ``"diff-pruning"`` (Taylor, from the
    gradients ``scored`` holds). In eval mode, parameters trainable, no gradients."""
    model = copy.deepcopy(scored).eval().requires_grad_(True)
    if importance == "diff-pruning":
        # Parameter's deepcopy drops .grad; torch-pruning's Taylor importance reads it (and prunes it along).
        for kept, source in zip(model.parameters(), scored.parameters()):
            if source.grad is None:
                raise ValueError("diff-pruning importance needs the gradients of accumulate_diffusion_gradients")
            kept.grad = source.grad.detach().clone()
    head_dims = {name: m.inner_dim // m.heads for name, m in model.named_modules() if isinstance(m, Attention)}
    with torch.enable_grad():  # torch-pruning traces the graph through autograd, also under a caller's no_grad
        pruner = _pruner(model, importance, pruning_ratio=max(0.0, 1.0 - share - _SHARE_SLACK))
    pruner.step()
    del pruner
    for name, attention in model.named_modules():
        if isinstance(attention, Attention):
            _keep_attention_temperature(attention, head_dims[name])
    sync_widths(model)
    model.zero_grad(set_to_none=True)
    return model


def achievable_shares(model: nn.Module) -> list[float]:
    """The distinct shares k / c (ascending, 1.0 last) at which some group of ``model`` with c channels per
    GroupNorm group or head changes width, from the smallest that keeps one channel in every such group:
    every width torch-pruning's per-layer pruning can reach is reached at one of them."""
    probe = copy.deepcopy(model).eval().requires_grad_(True)
    with torch.enable_grad():
        pruner = _pruner(probe, "magnitude", pruning_ratio=0.0)
    sizes = set()
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                           root_module_types=pruner.root_module_types):
        root, handler = group[0].dep.target.module, group[0].dep.handler
        channels = (pruner.DG.get_out_channels(root) if pruner.DG.is_out_channel_pruning_fn(handler)
                    else pruner.DG.get_in_channels(root))
        # How the pruner splits the group (GroupNorm groups, heads); private in torch-pruning 1.6.1.
        sizes.add(channels // pruner._get_channel_groups(group))
    smallest = 1.0 / min(sizes)
    return sorted({k / c for c in sizes for k in range(1, c + 1) if k / c >= smallest})


def sync_widths(model: nn.Module) -> None:
    """Re-read the widths diffusers' modules cache from their weights' shapes (after pruning or loading),
    and check every GroupNorm still splits its channels evenly."""
    for name, module in model.named_modules():
        if isinstance(module, (Downsample2D, Upsample2D)) and isinstance(getattr(module, "conv", None), nn.Conv2d):
            module.channels, module.out_channels = module.conv.in_channels, module.conv.out_channels
        elif isinstance(module, ResnetBlock2D):
            module.in_channels, module.out_channels = module.conv1.in_channels, module.conv2.out_channels
        elif isinstance(module, Attention):
            module.query_dim = module.to_q.in_features
            module.inner_dim = module.to_q.out_features
            module.inner_kv_dim = module.to_k.out_features
            module.cross_attention_dim = module.to_k.in_features
            module.out_dim = module.to_out[0].out_features
            if module.inner_dim % module.heads:
                raise RuntimeError(f"{name}: {module.inner_dim} attention dims do not split into {module.heads} heads")
            # The processors read attn.scale (AttnProcessor) or 1 / sqrt(head dim) (SDPA): keep them equal.
            module.scale = (module.inner_dim // module.heads) ** -0.5 if module.scale_qk else 1.0
        elif isinstance(module, nn.GroupNorm) and module.num_channels % module.num_groups:
            raise RuntimeError(f"{name}: {module.num_channels} channels do not split into {module.num_groups} groups")


def save_pruned(model: nn.Module, folder: Path) -> None:
    """Write ``model`` (from :func:`prune_unet`) to ``folder/pruned_unet.safetensors``, atomically: its
    weights, whose shapes are the pruned structure, and in the file's metadata its UNet2DModel config
    (the teacher's; see the module docstring for why not ``save_pretrained``)."""
    if not isinstance(model, UNet2DModel):
        raise ValueError(f"save_pruned writes pruned UNet2DModels; got a {type(model).__name__}")
    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "class": type(model).__name__,
                "config": model.to_json_string()}
    atomic_write_bytes(Path(folder) / WEIGHTS_FILE, safetensors.torch.save(tensors, metadata=metadata))


def load_pruned(folder: Path) -> nn.Module:
    """The pruned UNet :func:`save_pruned` wrote to ``folder``, in eval mode (parameters trainable)."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"no pruned UNet in {folder} (no {WEIGHTS_FILE})")
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if metadata.get("format") != FORMAT or metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a pyevo pruned UNet (format {FORMAT} version {FORMAT_VERSION})")
    config = json.loads(metadata["config"])
    # Built without weights: every tensor is then the stored one, of the pruned shape.
    with torch.device("meta"):
        model = UNet2DModel.from_config(config)
    expected = set(model.state_dict())
    if expected != set(tensors):
        raise ValueError(f"{path}: its tensors do not match a UNet2DModel of its config "
                         f"({len(expected ^ set(tensors))} names differ)")
    for name, tensor in tensors.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attribute in owner._parameters:
            owner._parameters[attribute] = nn.Parameter(tensor, requires_grad=True)
        else:
            owner._buffers[attribute] = tensor
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            module.num_channels = module.weight.shape[0] if module.weight is not None else module.num_channels
        elif isinstance(module, nn.Conv2d):
            module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = module.weight.shape[1]
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise ValueError(f"{path}: no stored tensor for {left[0]}")
    sync_widths(model)
    return model.eval()


def batch1_macs(unet: nn.Module) -> int:
    """MACs of one forward of one sample (zeros, timestep 0, class 0 where the UNet takes labels)."""
    sample, timesteps, conditions = _probe(unet)
    return count_macs(unet, sample, timesteps, **conditions)


def _pruner(model: nn.Module, importance: str, pruning_ratio: float) -> tp.pruner.BasePruner:
    """torch-pruning's per-layer (local) pruner of a UNet2DModel: conv_out's output is kept (conv_in's input
    and the sinusoidal embedding have no producer to prune); attention layers keep their heads."""
    scorer = (tp.importance.MagnitudeImportance(p=1) if importance == "magnitude"
              else tp.importance.TaylorImportance(multivariable=False))
    heads = {}
    for attention in model.modules():
        if isinstance(attention, Attention):
            for projection in (attention.to_q, attention.to_k, attention.to_v):
                heads[projection] = attention.heads
    sample, timesteps, conditions = _probe(model)
    return tp.pruner.BasePruner(
        model, {"sample": sample, "timestep": timesteps, **conditions}, importance=scorer,
        pruning_ratio=pruning_ratio, global_pruning=False, ignored_layers=[model.conv_out], num_heads=heads,
        prune_num_heads=False, prune_head_dims=True, output_transform=lambda output: output.sample)


def _keep_attention_temperature(attention: Attention, teacher_head_dim: int) -> None:
    """Scale the query projection by sqrt(d' / d) after pruning head dims d -> d', so that the pruned
    scores q.k / sqrt(d') on the kept dims equal the teacher's q.k / sqrt(d)."""
    head_dim = attention.to_q.out_features // attention.heads
    if head_dim == teacher_head_dim or not attention.scale_qk:
        return
    factor = math.sqrt(head_dim / teacher_head_dim)
    with torch.no_grad():
        attention.to_q.weight.mul_(factor)
        if attention.to_q.bias is not None:
            attention.to_q.bias.mul_(factor)


def _probe(unet: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The batch-1 inputs MACs are counted on and the graph is traced with: zeros, timestep 0, class 0."""
    device = model_device(unet)
    dtype = next(unet.parameters()).dtype
    sample = torch.zeros(1, *sample_shape(unet), device=device, dtype=dtype)
    timesteps = torch.zeros(1, dtype=torch.long, device=device)
    labels = probe_labels(unet, 1, device)
    return sample, timesteps, {} if labels is None else {"class_labels": labels}


def _prunable_channels(unet: nn.Module) -> int:
    """Output channels of every convolution and linear but conv_out (what pruning can remove)."""
    return sum(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for m in unet.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not unet.conv_out)
