"""The teacher stage: load a diffusers UNet from a local folder and record what its blocks see.

A teacher is a ``UNet2DModel`` (pixel or latent; unconditional or class-conditional) or a
``UNet2DConditionModel`` (text-conditional, Stable-Diffusion-shaped: its forward takes
``encoder_hidden_states``; SDXL-shaped ones, ``addition_embed_type="text_time"``, also
``added_cond_kwargs``: see :mod:`pyevo.conditions`). The searchable blocks are
``down_blocks[i]``, ``mid_block`` and ``up_blocks[i]``; the stem and the head (conv_in, time
embedding, conv_norm_out, conv_out) stay the teacher's.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pyevo.diffusion import prediction_type
from pyevo.space import searchable_blocks

log = logging.getLogger(__name__)


class TeacherError(ValueError):
    """The teacher a user named cannot be used (missing folder, unsupported model)."""


UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
SUPPORTED_UNETS = tuple(UNET_CLASSES)
BUILT_IN_TEACHERS = ("digits", "latent-digits")
# class_embed_type values whose class_labels are integer labels (None: an nn.Embedding table).
LABEL_EMBEDDINGS = (None, "timestep")
# The one addition_embed_type pyevo feeds: SDXL's pooled text embeddings and size/crop ids (added_cond_kwargs).
TEXT_TIME = "text_time"
ADDED_KEYS = ("text_embeds", "time_ids")


def load_teacher(spec: str, scheduler: str | None = None) -> tuple[ModelMixin, DDPMScheduler]:
    """The one teacher loader: a built-in teacher (``"digits"``, ``"latent-digits"``) or a local
    folder, in eval mode. A latent teacher's autoencoder is loaded beside it by
    :func:`pyevo.autoencoder.teacher_autoencoder`.

    The folder is a diffusers pipeline folder (``unet/`` and ``scheduler/``; ``vae/`` or ``vqvae/``
    and ``model_index.json`` optional) or a bare UNet folder (``config.json`` + weights). ``scheduler``
    names a scheduler folder (``scheduler_config.json``, or a pipeline folder with ``scheduler/``)
    and overrides the pipeline's own; a bare UNet folder needs it: no schedule is ever assumed.
    The schedule is read into a ``DDPMScheduler`` (the forward process every stage trains on); its
    ``prediction_type`` is the teacher's. Raises ``TeacherError`` with a one-line reason.
    """
    folder = resolve_teacher_folder(spec)
    if not folder.is_dir():
        raise TeacherError(f"teacher folder not found: {folder}")
    unet_folder = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config = read_config_json(unet_folder / "config.json", f"{folder} is not a diffusers UNet folder "
                                                     "(no config.json or unet/config.json)", UNET_FIELDS)
    class_name = config.get("_class_name")
    if class_name not in SUPPORTED_UNETS:
        raise TeacherError(f"{unet_folder} holds a {class_name}; pyevo supports {', '.join(SUPPORTED_UNETS)}")
    if config.get("class_embed_type") not in LABEL_EMBEDDINGS:
        raise TeacherError(f"{unet_folder}: class_embed_type {config.get('class_embed_type')!r} takes embedding "
                           "vectors, not class labels; pyevo supports integer class labels "
                           "(num_class_embeds, or class_embed_type 'timestep')")
    if config.get("time_embedding_type") == "fourier":
        # GaussianFourierProjection embeds log(t): score-SDE teachers take continuous noise levels
        # (ScoreSdeVeScheduler), not the integer DDPM timesteps, 0 included, that pyevo trains on.
        raise TeacherError(f"{unet_folder}: time_embedding_type 'fourier' takes continuous noise levels "
                           "(score-SDE, log t); pyevo trains on DDPM timesteps: use a 'positional' teacher")
    if class_name == "UNet2DConditionModel":
        _check_text_conditional_config(config, unet_folder)
    try:
        unet = UNET_CLASSES[class_name].from_pretrained(unet_folder, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
        raise TeacherError(f"cannot load the UNet in {unet_folder}: {first_line(error)}") from None
    return unet.eval().requires_grad_(False), _load_scheduler(folder, unet_folder, scheduler)


def _check_text_conditional_config(config: dict, unet_folder: Path) -> None:
    """Refuse, in one line, the UNet2DConditionModel options whose extra inputs pyevo does not feed.

    pyevo feeds a text-conditional UNet its timestep, ``encoder_hidden_states`` and, for SDXL's
    ``addition_embed_type="text_time"``, ``added_cond_kwargs`` (text_embeds and time_ids); block types
    and attention variants are checked by the search space (:func:`pyevo.space.unet_space`)."""
    if config.get("addition_embed_type") not in (None, TEXT_TIME):
        raise TeacherError(f"{unet_folder}: addition_embed_type {config['addition_embed_type']!r} takes "
                           "added_cond_kwargs pyevo does not feed (image embeddings, hints, text alone); pyevo "
                           f"supports text-conditional UNet2DConditionModels with addition_embed_type None or "
                           f"{TEXT_TIME!r} (SDXL's text_embeds and time_ids)")
    refusals = {
        "encoder_hid_dim_type": "projects its encoder states first (encoder_hid_proj)",
        "num_class_embeds": "is class- as well as text-conditional",
        "class_embed_type": "is class- as well as text-conditional",
        "time_cond_proj_dim": "takes a timestep_cond (a guidance embedding)",
    }
    for key, why in refusals.items():
        if config.get(key) is not None:
            raise TeacherError(f"{unet_folder}: {key} {config[key]!r} {why}; pyevo supports text-conditional "
                               "UNet2DConditionModels conditioned by encoder_hidden_states (and SDXL's "
                               "added_cond_kwargs)")
    if config.get("attention_type", "default") != "default":
        raise TeacherError(f"{unet_folder}: attention_type {config['attention_type']!r} (GLIGEN's gated "
                           "attention) is not supported; pyevo supports attention_type 'default'")
    dims = config.get("cross_attention_dim")
    if isinstance(dims, (list, tuple)) and len(set(dims)) > 1:
        raise TeacherError(f"{unet_folder}: cross_attention_dim {list(dims)} differs between blocks; pyevo feeds "
                           "every block the same encoder states")


def resolve_teacher_folder(spec: str) -> Path:
    """The folder a teacher spec names: a built-in teacher's shipped folder, or the path itself."""
    if spec in BUILT_IN_TEACHERS:
        from pyevo.teachers import DIGITS_TEACHER_DIR, LATENT_DIGITS_TEACHER_DIR

        return DIGITS_TEACHER_DIR if spec == "digits" else LATENT_DIGITS_TEACHER_DIR
    return Path(spec).expanduser()


def _load_scheduler(folder: Path, unet_folder: Path, override: str | None) -> DDPMScheduler:
    if override is not None:
        where = Path(override).expanduser()
        if (where / "scheduler" / "scheduler_config.json").is_file():
            where = where / "scheduler"
        if not (where / "scheduler_config.json").is_file():
            raise TeacherError(f"--scheduler {override}: no scheduler_config.json there (nor in scheduler/)")
    elif (folder / "scheduler" / "scheduler_config.json").is_file():
        where = folder / "scheduler"
    else:
        kind = "pipeline folder" if unet_folder != folder else "bare UNet folder"
        raise TeacherError(f"{folder} is a {kind} without scheduler/: pass --scheduler DIR "
                           "(the noise schedule the teacher was trained with)")
    read_config_json(where / "scheduler_config.json", f"{where} holds no scheduler config", SCHEDULER_FIELDS)
    try:
        scheduler = DDPMScheduler.from_pretrained(where, local_files_only=True)
        prediction_type(scheduler)
    except (OSError, ValueError, TypeError, KeyError, NotImplementedError) as error:
        raise TeacherError(f"cannot use the scheduler in {where}: {first_line(error)}") from None
    return scheduler


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_ints(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_positive_int(v) for v in value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Fields of a UNet's and a scheduler's config.json that pyevo reads itself, and what each must be
# (diffusers takes a string sample_size, say, and fails much later, or never).
UNET_FIELDS = {
    "sample_size": (lambda v: _positive_int(v) or (_positive_ints(v) and len(v) == 2),
                    "a positive integer or [height, width]"),
    "in_channels": (_positive_int, "a positive integer"),
    "out_channels": (_positive_int, "a positive integer"),
    "block_out_channels": (_positive_ints, "a list of positive integers"),
    "layers_per_block": (lambda v: _positive_int(v) or _positive_ints(v), "a positive integer (or one per block)"),
    "norm_num_groups": (lambda v: v is None or _positive_int(v), "a positive integer"),
    "num_class_embeds": (lambda v: v is None or _positive_int(v), "a positive integer or null"),
}
SCHEDULER_FIELDS = {
    "num_train_timesteps": (_positive_int, "a positive integer"),
    "beta_start": (_number, "a number"),
    "beta_end": (_number, "a number"),
    "beta_schedule": (lambda v: isinstance(v, str), "a string"),
    "prediction_type": (lambda v: isinstance(v, str), "a string"),
}


def read_config_json(path: Path, missing: str, fields: dict | None = None) -> dict:
    """A model folder's JSON config as a dict, or a TeacherError in one line (missing, not JSON, not an
    object, or one of ``fields``, name -> (check, what it must be), present with a value of another kind)."""
    if not path.is_file():
        raise TeacherError(missing)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TeacherError(f"{path} is not valid JSON ({getattr(error, 'msg', error)})") from None
    if not isinstance(data, dict):
        raise TeacherError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    for key, (check, kind) in (fields or {}).items():
        if key in data and not check(data[key]):
            raise TeacherError(f"{path}: {key} must be {kind}, got {data[key]!r}")
    return data


def first_line(error: BaseException) -> str:
    """An exception's first line (its type's name when it says nothing), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_class_conditional(unet: nn.Module) -> bool:
    """Whether the UNet's forward takes ``class_labels`` (diffusers builds a class embedding)."""
    return getattr(unet, "class_embedding", None) is not None


def is_text_conditional(unet: nn.Module) -> bool:
    """Whether the UNet's forward takes ``encoder_hidden_states`` (a UNet2DConditionModel, students included)."""
    return isinstance(unet, UNet2DConditionModel)


def cross_attention_dim(unet: nn.Module) -> int:
    """The width D of the encoder states a text-conditional UNet attends to (one for every block)."""
    dims = unet.config.cross_attention_dim
    return int(dims[0] if isinstance(dims, (list, tuple)) else dims)


def takes_added_conditions(unet: nn.Module) -> bool:
    """Whether the UNet's forward takes SDXL's ``added_cond_kwargs`` (``addition_embed_type="text_time"``:
    ``text_embeds`` [B, P] and ``time_ids`` [B, K], which its time embedding adds to ``temb``)."""
    return is_text_conditional(unet) and unet.config.get("addition_embed_type") == TEXT_TIME


def added_condition_width(unet: nn.Module) -> int:
    """P + K * addition_time_embed_dim, what the UNet's ``add_embedding`` takes: the width of the pooled
    text embeddings P plus K time ids, each embedded in ``addition_time_embed_dim`` sinusoids."""
    return int(unet.config.projection_class_embeddings_input_dim)


def conditioning(unet: nn.Module, class_labels: torch.Tensor | None = None,
                 encoder_hidden_states: torch.Tensor | None = None,
                 added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The keyword arguments of ``unet``'s forward for its conditions: ``class_labels`` (None for an
    unconditional UNet), ``encoder_hidden_states`` for a text-conditional one (UNet2DModel's forward
    has no such argument) and ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) for an SDXL-shaped
    one; each exactly where the UNet takes it, rows as many as the sample's."""
    kwargs: dict[str, Any] = {"class_labels": class_labels}
    if is_text_conditional(unet):
        if encoder_hidden_states is None:
            raise ValueError("a text-conditional UNet needs encoder_hidden_states")
        kwargs["encoder_hidden_states"] = encoder_hidden_states
    elif encoder_hidden_states is not None:
        raise ValueError(f"a {type(unet).__name__} takes no encoder_hidden_states")
    if takes_added_conditions(unet):
        if added_cond_kwargs is None or set(added_cond_kwargs) != set(ADDED_KEYS):
            raise ValueError(f"an addition_embed_type {TEXT_TIME!r} UNet needs added_cond_kwargs with "
                             f"{' and '.join(ADDED_KEYS)}, got {None if added_cond_kwargs is None else sorted(added_cond_kwargs)}")
        rows = {len(t) for t in added_cond_kwargs.values()} | {len(encoder_hidden_states)}
        if len(rows) != 1:
            raise ValueError(f"added_cond_kwargs and encoder_hidden_states differ in rows ({sorted(rows)})")
        kwargs["added_cond_kwargs"] = dict(added_cond_kwargs)
    elif added_cond_kwargs is not None:
        raise ValueError(f"this {type(unet).__name__} takes no added_cond_kwargs")
    return kwargs


def num_class_embeds(unet: nn.Module) -> int | None:
    """The size of the teacher's label table; None when labels are not bounded by one (or absent)."""
    return unet.config.num_class_embeds if is_class_conditional(unet) and unet.config.class_embed_type is None else None


def probe_labels(unet: nn.Module, batch: int, device: torch.device | str) -> torch.Tensor | None:
    """Labels for a forward whose labels do not matter (timing, MAC counting): class 0, or None."""
    return torch.zeros(batch, dtype=torch.long, device=device) if is_class_conditional(unet) else None


def model_device(module: nn.Module) -> torch.device:
    """Where a module's weights are (the CPU for a module without any)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def sample_shape(unet: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of one sample the UNet takes (``sample_size`` may be an int)."""
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, *size)


@dataclass
class BlockCall:
    """One recorded call of a block: its inputs and its output (detached)."""

    args: tuple
    kwargs: dict[str, Any]
    output: Any

    def select(self, index: torch.Tensor | slice) -> "BlockCall":
        """The same call restricted to some batch rows (every tensor sliced along dim 0)."""
        return BlockCall(_map_tensors(self.args, lambda t: t[index]),
                         _map_tensors(self.kwargs, lambda t: t[index]),
                         _map_tensors(self.output, lambda t: t[index]))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "BlockCall":
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return BlockCall(_map_tensors(self.args, move), _map_tensors(self.kwargs, move),
                         _map_tensors(self.output, move))


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def output_tensors(output: Any) -> list[torch.Tensor]:
    """A block's output as a flat list of tensors (down blocks return (hidden, (res, ...)))."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    if hasattr(output, "to_tuple"):
        return output_tensors(output.to_tuple())
    return []


def _detached(tensor: torch.Tensor) -> torch.Tensor:
    # Contiguous as well: oneDNN convolutions may return channels-last tensors, and torch 2.13's
    # CPU GroupNorm backward crashes (segfault) on a channels-last input that needs no gradient,
    # which is exactly what a recorded block input is.
    return tensor.detach().contiguous()


def record_blocks(unet: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                  class_labels: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                  added_cond_kwargs: dict[str, torch.Tensor] | None = None
                  ) -> tuple[dict[str, BlockCall], torch.Tensor]:
    """Run the teacher once; return every searchable block's inputs and output, and its prediction.

    The blocks see the labels through the time embedding they are handed (``temb``), so a recorded
    call of a class-conditional teacher carries its labels without naming them; so it carries an
    SDXL-shaped teacher's ``added_cond_kwargs``, which UNet2DConditionModel embeds and adds to ``temb``
    before any block runs (no block takes them). A text-conditional teacher hands its cross-attention
    blocks ``encoder_hidden_states`` as a keyword argument, so the recorded call carries them too, and
    replaying it feeds them to a student or super block.
    """
    calls: dict[str, BlockCall] = {}
    pending: dict[str, tuple] = {}
    handles = []
    for name, block in searchable_blocks(unet).items():
        def before(module, args, kwargs, name=name):
            pending[name] = (_map_tensors(args, _detached), _map_tensors(kwargs, _detached))

        def after(module, args, kwargs, output, name=name):
            block_args, block_kwargs = pending.pop(name)
            calls[name] = BlockCall(block_args, block_kwargs, _map_tensors(output, _detached))

        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    try:
        with torch.no_grad():
            prediction = unet(sample, timesteps, **conditioning(unet, class_labels, encoder_hidden_states,
                                                                added_cond_kwargs)).sample
    finally:
        for handle in handles:
            handle.remove()
    return calls, prediction


def noise_to_signal(student_output: Any, teacher_output: Any) -> torch.Tensor:
    """NSR = ||S - T||^2 / ||T||^2 over all the block's output tensors (scale-free)."""
    # In float32 at least: under mixed precision the outputs may be bfloat16, too coarse for sums.
    pairs = [(at_least_float32(s), at_least_float32(t)) for s, t in zip(output_tensors(student_output), output_tensors(teacher_output))]
    num = sum(((s - t) ** 2).sum() for s, t in pairs)
    den = sum((t ** 2).sum() for _, t in pairs)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """float32, or the tensor's own dtype where that is wider (a float64 reference stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
