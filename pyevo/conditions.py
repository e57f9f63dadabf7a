"""Text conditions of a text-conditional teacher (a ``UNet2DConditionModel``): its prompts' encoder states.

``--conditions FILE`` names a text file of prompts, one a line (``.txt``), which the teacher pipeline's
own ``tokenizer/`` and ``text_encoder/`` encode as ``StableDiffusionPipeline`` does (the unconditional
states: the empty prompt's, as the pipeline's default negative prompt), or a safetensors file holding

* ``encoder_hidden_states`` [N, L, D]: N prompts' text-encoder states (what a pipeline's text encoder
  makes of them), D the UNet's ``cross_attention_dim``;
* optionally ``negative_encoder_hidden_states`` [1, L, D] (or [L, D]): the unconditional states that
  classifier-free guidance contrasts with, as ``StableDiffusionPipeline`` makes them from its negative
  prompt (the empty prompt by default). When the file has none, the unconditional states are zeros
  (what pyevo can offer without a text encoder; SDXL pipelines' ``force_zeros_for_empty_prompt`` uses
  them too). Stable Diffusion 1.x learnt the empty prompt's states instead: for such a teacher store
  the encoding of ``""`` in the file (or give prompts), and its guided samples are the pipeline's;
* for an SDXL-shaped teacher (``addition_embed_type="text_time"``), its ``added_cond_kwargs`` too:
  ``text_embeds`` [N, P] (the pooled output of the second text encoder) and ``time_ids`` [N, K]
  (original size, crop top-left, target size in pixels: K = 6), with P + K x ``addition_time_embed_dim``
  = the UNet's ``projection_class_embeddings_input_dim``; and, like the negative states, optionally
  ``negative_text_embeds`` [1, P] (zeros when absent, as ``force_zeros_for_empty_prompt``) and
  ``negative_time_ids`` [1, K] (when absent, the rows' own, as StableDiffusionXLPipeline's default; the
  file must then give every row the same). ``pipe.encode_prompt(prompts, "cpu", 1, True)`` of a
  StableDiffusionXLPipeline returns the states, negative states, text_embeds and negative text_embeds.

A prompts file for an SDXL-shaped teacher is encoded as StableDiffusionXLPipeline.encode_prompt encodes
it, by the pipeline folder's two text encoders (``tokenizer/`` + ``text_encoder/``, ``tokenizer_2/`` +
``text_encoder_2/``): their penultimate hidden states side by side, the second one's pooled output as
``text_embeds``; ``time_ids`` from the sample size in pixels (original = target, no crop), and the
unconditional conditions zeros where the pipeline's ``force_zeros_for_empty_prompt`` says so (its
default), otherwise the empty prompt's.

Data-free runs draw the teacher's sampling trajectories from these states (with guidance when
``guidance_scale`` > 1); the evaluation samples teacher and student from the same states and noise.
Under guidance the student is also called at the unconditional states (and the guided prediction
amplifies the difference of its two predictions), so guided runs train and score on both
(:func:`with_unconditional_rows`). Every problem with the file is a one-line :class:`ConditionsError`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch
from torch import nn

from pyevo.diffusion import ImageSet
from pyevo.runfolder import tensor_digest
from pyevo.teacher import (ADDED_KEYS, added_condition_width, cross_attention_dim, first_line, is_text_conditional,
                           takes_added_conditions)

log = logging.getLogger(__name__)

STATES_KEY = "encoder_hidden_states"
NEGATIVE_KEY = "negative_encoder_hidden_states"
NEGATIVE_PREFIX = "negative_"  # negative_text_embeds, negative_time_ids beside the added conditions' keys
PROMPTS_SUFFIX = ".txt"
SDXL_TIME_IDS = 6  # original height, width; crop top, left; target height, width


class ConditionsError(ValueError):
    """The conditions a user gave cannot condition the teacher (missing, unreadable, wrongly shaped)."""


@dataclass
class Conditions:
    """N prompts' encoder states [N, L, D] and the unconditional states [1, L, D] (float32, on the CPU);
    for an SDXL-shaped teacher also their ``added_cond_kwargs`` (``text_embeds`` [N, P], ``time_ids``
    [N, K]) and the unconditional ones (``negative_added``: [1, P], [1, K])."""

    states: torch.Tensor
    negative: torch.Tensor
    source: str  # the file (or caption folder) they were read from
    unconditional: str = "zeros"  # where the unconditional states came from: zeros, the file, the empty prompt
    prompts: tuple[str, ...] | None = None  # the texts the states encode, where known (prompts, captions)
    added: dict[str, torch.Tensor] | None = None
    negative_added: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.states.ndim != 3 or self.negative.shape != (1, *self.states.shape[1:]):
            raise ValueError(f"conditions must be [N, L, D] with negative [1, L, D], got {tuple(self.states.shape)} "
                             f"and {tuple(self.negative.shape)}")
        if self.prompts is not None and len(self.prompts) != len(self.states):
            raise ValueError(f"{len(self.prompts)} prompts for {len(self.states)} rows of states")
        if (self.added is None) != (self.negative_added is None):
            raise ValueError("added conditions come with their unconditional ones")
        for key, value in (self.added or {}).items():
            if value.ndim != 2 or len(value) != len(self.states) or self.negative_added[key].shape != (1, value.shape[1]):
                raise ValueError(f"added condition {key} must be [N, W] with negative [1, W], got "
                                 f"{tuple(value.shape)} and {tuple(self.negative_added[key].shape)}")

    def __len__(self) -> int:
        return len(self.states)

    @property
    def sequence_length(self) -> int:
        return self.states.shape[1]

    def rows(self, count: int) -> torch.Tensor:
        """``count`` rows of states cycling through the N prompts (equal use of each, in file order)."""
        return self.states[torch.arange(count) % len(self.states)]

    def added_rows(self, count: int) -> dict[str, torch.Tensor] | None:
        """The added conditions of :meth:`rows`' ``count`` rows (None for a teacher that takes none)."""
        if self.added is None:
            return None
        index = torch.arange(count) % len(self.states)
        return {key: value[index] for key, value in self.added.items()}

    def prompt_rows(self, count: int) -> list[str] | None:
        """The prompts of :meth:`rows`' ``count`` rows (None where the states came without their texts)."""
        return None if self.prompts is None else [self.prompts[i % len(self.prompts)] for i in range(count)]

    def digest(self) -> str:
        """A digest of the states and the unconditional states, added conditions included (for stage keys)."""
        added = [] if self.added is None else [group[key] for group in (self.added, self.negative_added)
                                               for key in sorted(group)]
        return tensor_digest([self.states, self.negative, *added])


def condition_rows(conditions: Conditions | None, count: int) -> torch.Tensor | None:
    """:meth:`Conditions.rows`, or None for a teacher without text conditions."""
    return None if conditions is None else conditions.rows(count)


def added_condition_rows(conditions: Conditions | None, count: int) -> dict[str, torch.Tensor] | None:
    """:meth:`Conditions.added_rows`: ``count`` rows of ``added_cond_kwargs``, or None for a teacher without them."""
    return None if conditions is None else conditions.added_rows(count)


def warn_of_zero_guidance(conditions: Conditions | None, guidance_scale: float) -> None:
    """A warning when samples will be guided away from zero states that stand in for the empty prompt's
    (not for SDXL-shaped teachers, whose pipelines' default, ``force_zeros_for_empty_prompt``, is zeros)."""
    if guidance(conditions, guidance_scale) and conditions.unconditional == "zeros" and conditions.added is None:
        log.warning("guidance %g contrasts with zero states: %s has no %s. A teacher trained on the empty "
                    "prompt's states (Stable Diffusion 1.x) is guided as its pipeline guides it only with those "
                    "states in the file, or with prompts (.txt)", guidance_scale, conditions.source, NEGATIVE_KEY)


def guidance(conditions: Conditions | None, guidance_scale: float) -> dict:
    """The keyword arguments of :func:`pyevo.sample.ddim_sample` for classifier-free guidance: the
    scale and the unconditional states (and added conditions, where the teacher takes them), or nothing
    when there are no conditions or the scale is <= 1."""
    if conditions is None or guidance_scale <= 1.0:
        return {}
    kwargs = {"guidance_scale": guidance_scale, "negative_encoder_hidden_states": conditions.negative}
    if conditions.negative_added is not None:
        kwargs["negative_added_cond_kwargs"] = conditions.negative_added
    return kwargs


def with_unconditional_rows(data: ImageSet, negative: torch.Tensor,
                            negative_added: dict[str, torch.Tensor] | None = None) -> ImageSet:
    """``data`` with every image twice, interleaved: at its own states, then at the unconditional states
    ``negative`` [1, L, D] (and added conditions ``negative_added``, [1, W] each), as a guided sampler
    calls the UNet at each noisy image. Interleaved, so that any prefix (the held-out set's first rows)
    holds both kinds equally."""
    order = torch.arange(2 * len(data)) // 2
    states = data.encoder_hidden_states[order]  # a copy: indexing by a tensor
    states[1::2] = negative
    added = None
    if data.added_cond_kwargs is not None:
        added = {key: value[order] for key, value in data.added_cond_kwargs.items()}
        for key, value in added.items():
            value[1::2] = negative_added[key]
    return ImageSet(data.images[order], None if data.labels is None else data.labels[order], states, added)


class RawConditions(NamedTuple):
    """Conditions as read from a file or encoded from prompts, before :func:`_checked` checks them against
    the UNet: the states; the unconditional states (None: zeros) and where they came from; the added
    conditions (``text_embeds``, ``time_ids``) and the unconditional ones given (a key left out: its default)."""

    states: torch.Tensor
    negative: torch.Tensor | None
    unconditional: str
    added: dict[str, torch.Tensor] | None = None
    negative_added: dict[str, torch.Tensor] | None = None


def load_conditions(path: str, unet: nn.Module, teacher_folder: Path | None = None) -> Conditions | None:
    """The conditions ``path`` holds for ``unet``; None for a UNet without text conditions and no path.

    ``path`` is a safetensors file of states (and, for an SDXL-shaped UNet, added conditions), or a
    text file of prompts (``.txt``, one a line) that the text encoder(s) and tokenizer(s) of the
    teacher's pipeline folder ``teacher_folder`` encode (:func:`encode_prompts`). Raises ConditionsError
    in one line: a text-conditional UNet without a file, a file for a UNet that takes none, a missing
    or unreadable file, no ``encoder_hidden_states`` tensor, a tensor that is not [N, L, D] floats, D
    not the UNet's ``cross_attention_dim``, an unconditional tensor of another shape, non-finite
    values; added conditions missing, wrongly shaped, or given to a UNet that takes none; prompts
    without the pipeline's text encoder(s).
    """
    conditional = is_text_conditional(unet)
    if not path:
        if conditional:
            added = (f", {', '.join(f'{key} [N, ...]' for key in ADDED_KEYS)}" if takes_added_conditions(unet)
                     else "")
            raise ConditionsError(f"the teacher is a text-conditional {type(unet).__name__}: pass --conditions FILE "
                                  f"(a safetensors file with {STATES_KEY} [N, L, {cross_attention_dim(unet)}]{added}, "
                                  "or a .txt file of prompts for the teacher pipeline's text encoder)")
        return None
    if not conditional:
        raise ConditionsError(f"--conditions {path}: the teacher is a {type(unet).__name__}, which takes no text "
                              "conditions (encoder_hidden_states)")
    where = Path(path).expanduser()
    if not where.is_file():
        raise ConditionsError(f"conditions file not found: {where}")
    if where.suffix == PROMPTS_SUFFIX:
        prompts = read_prompts(where)
        return _checked(encode_prompts(prompts, teacher_folder, f"prompts file {where}", unet=unet), unet, where,
                        prompts)
    return _checked(_read_states(where), unet, where)


def _read_states(where: Path) -> RawConditions:
    try:
        tensors = safetensors.torch.load_file(where)
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as error:
        raise ConditionsError(f"conditions file {where} is not a readable safetensors file: "
                              f"{first_line(error)}") from None
    if STATES_KEY not in tensors:
        raise ConditionsError(f"conditions file {where} has no tensor {STATES_KEY!r} (it has "
                              f"{', '.join(sorted(tensors)) or 'none'})")
    added = {key: tensors[key] for key in ADDED_KEYS if key in tensors}
    negative_added = {key: tensors[NEGATIVE_PREFIX + key] for key in ADDED_KEYS if NEGATIVE_PREFIX + key in tensors}
    return RawConditions(tensors[STATES_KEY], tensors.get(NEGATIVE_KEY),
                         "the file" if NEGATIVE_KEY in tensors else "zeros", added or None, negative_added or None)


def _checked(raw: RawConditions, unet: nn.Module, where: Path, prompts: list[str] | None = None) -> Conditions:
    """The states and unconditional states (zeros when None), and the added conditions where the UNet
    takes them, checked against the UNet: the one place conditions are validated."""
    states, negative = raw.states, raw.negative
    dim = cross_attention_dim(unet)
    if states.ndim != 3 or not states.is_floating_point() or 0 in states.shape:
        raise ConditionsError(f"conditions file {where}: {STATES_KEY} must be a non-empty float tensor [N, L, D], "
                              f"got {states.dtype} {list(states.shape)}")
    if states.shape[2] != dim:
        raise ConditionsError(f"conditions file {where}: {STATES_KEY} has D = {states.shape[2]}, but the teacher's "
                              f"cross_attention_dim is {dim}")
    if negative is None:
        negative = torch.zeros(1, *states.shape[1:])
    else:
        if negative.ndim == 2:
            negative = negative[None]
        if tuple(negative.shape) != (1, *states.shape[1:]) or not negative.is_floating_point():
            raise ConditionsError(f"conditions file {where}: {NEGATIVE_KEY} must be [1, L, D] = "
                                  f"{[1, *states.shape[1:]]} like {STATES_KEY}, got {list(negative.shape)}")
    states, negative = states.float().contiguous(), negative.float().contiguous()
    added, negative_added = _checked_added(raw, unet, where, len(states))
    every = [states, negative, *(added or {}).values(), *(negative_added or {}).values()]
    if not all(bool(torch.isfinite(t).all()) for t in every):
        raise ConditionsError(f"conditions file {where} holds non-finite values")
    log.info("conditions: %d prompts' states [%d, %d]%s from %s; unconditional states: %s", len(states),
             states.shape[1], dim, "" if added is None else
             " with text_embeds [%d] and time_ids [%d]" % (added["text_embeds"].shape[1], added["time_ids"].shape[1]),
             where, raw.unconditional)
    return Conditions(states, negative, str(where), raw.unconditional, None if prompts is None else tuple(prompts),
                      added, negative_added)


def _checked_added(raw: RawConditions, unet: nn.Module, where: Path, rows: int
                   ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """An SDXL-shaped UNet's added conditions [N, P] / [N, K] and their unconditional rows [1, P] / [1, K]
    (zeros, and the rows' own time ids, where not given); None for a UNet that takes none."""
    given = {**(raw.added or {}), **{NEGATIVE_PREFIX + k: v for k, v in (raw.negative_added or {}).items()}}
    if not takes_added_conditions(unet):
        if given:
            raise ConditionsError(f"conditions file {where} holds {', '.join(sorted(given))}: added conditions "
                                  "(SDXL's added_cond_kwargs), but the teacher's addition_embed_type is "
                                  f"{unet.config.get('addition_embed_type')!r}, not 'text_time': it takes none")
        return None, None
    missing = [key for key in ADDED_KEYS if key not in (raw.added or {})]
    if missing:
        raise ConditionsError(f"conditions file {where}: the teacher (addition_embed_type 'text_time', SDXL-shaped) "
                              f"takes added_cond_kwargs, and the file has no {' or '.join(missing)} (text_embeds "
                              "[N, P]: the second text encoder's pooled output; time_ids [N, 6]: original size, "
                              "crop top-left, target size in pixels)")
    added = {}
    for key in ADDED_KEYS:
        value = raw.added[key]
        if value.ndim != 2 or len(value) != rows or value.shape[1] == 0 or value.dtype == torch.bool:
            raise ConditionsError(f"conditions file {where}: {key} must be [N, W] numbers with N = {rows} rows like "
                                  f"{STATES_KEY}, got {value.dtype} {list(value.shape)}")
        added[key] = value.float().contiguous()
    text, ids = added["text_embeds"], added["time_ids"]
    time_dim, width = int(unet.config.addition_time_embed_dim), added_condition_width(unet)
    if text.shape[1] + ids.shape[1] * time_dim != width:
        raise ConditionsError(f"conditions file {where}: text_embeds [N, {text.shape[1]}] and time_ids "
                              f"[N, {ids.shape[1]}] make {text.shape[1]} + {ids.shape[1]} x {time_dim} = "
                              f"{text.shape[1] + ids.shape[1] * time_dim} inputs to the teacher's add_embedding, "
                              f"which takes projection_class_embeddings_input_dim = {width}")
    negative_added = {}
    for key, value in added.items():
        negative = (raw.negative_added or {}).get(key)
        if negative is None:
            if key == "text_embeds":
                negative = torch.zeros_like(value[:1])
            elif bool((value == value[:1]).all()):
                negative = value[:1].clone()
            else:
                raise ConditionsError(f"conditions file {where}: time_ids differ between rows, so the unconditional "
                                      f"rows' cannot be theirs: give {NEGATIVE_PREFIX}time_ids [1, {value.shape[1]}]")
        if negative.ndim == 1:
            negative = negative[None]
        if tuple(negative.shape) != (1, value.shape[1]) or negative.dtype == torch.bool:
            raise ConditionsError(f"conditions file {where}: {NEGATIVE_PREFIX}{key} must be [1, {value.shape[1]}] "
                                  f"like {key}, got {list(negative.shape)}")
        negative_added[key] = negative.float().contiguous()
    return added, negative_added


def caption_conditions(captions: list[str], unet: nn.Module, teacher_folder: Path | None, where: Path) -> Conditions:
    """The states of an image folder's captions (one row per image, in order) and the unconditional ones,
    encoded by the teacher pipeline's text encoder(s) (:func:`encode_prompts`) and checked against the UNet."""
    encoded = encode_prompts(captions, teacher_folder, f"the captions of {where}", unet=unet)
    return _checked(encoded, unet, where, captions)


def read_prompts(path: Path) -> list[str]:
    """The prompts of a text file, one a line (blank lines left out)."""
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise ConditionsError(f"prompts file {path} cannot be read as UTF-8 text: {first_line(error)}") from None
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise ConditionsError(f"prompts file {path} holds no prompt (one a line)")
    return prompts


def encode_prompts(prompts: list[str], teacher_folder: Path | None, where: str = "the prompts",
                   batch_size: int = 64, unet: nn.Module | None = None) -> RawConditions:
    """``prompts``' states [N, L, D] and the unconditional ones, from the text encoder(s) of the pipeline
    folder ``teacher_folder`` (local files only).

    For a Stable-Diffusion-shaped UNet (or ``unet`` None), as StableDiffusionPipeline.encode_prompt
    encodes them with ``tokenizer/`` and ``text_encoder/``: padded to the tokenizer's
    ``model_max_length``, truncated, the text encoder's last hidden states (with an attention mask where
    its config asks); the unconditional states are the empty prompt's. For an SDXL-shaped ``unet``,
    as StableDiffusionXLPipeline.encode_prompt encodes them (:func:`_encode_prompts_xl`)."""
    if unet is not None and takes_added_conditions(unet):
        return _encode_prompts_xl(prompts, teacher_folder, unet, where, batch_size)
    tokenizer, text_encoder = _text_encoder(teacher_folder, ("tokenizer", "text_encoder"), where)
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        parts = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start:start + batch_size], padding="max_length", truncation=True,
                               max_length=tokenizer.model_max_length, return_tensors="pt")
            mask = tokens.attention_mask if use_mask else None
            parts.append(text_encoder(tokens.input_ids, attention_mask=mask)[0].float())
        return torch.cat(parts)

    log.info("encoding %d prompts from %s with the teacher's text encoder", len(prompts), where)
    return RawConditions(encode(prompts), encode([""]), "the empty prompt")


TEXT_ENCODER_FOLDERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def _text_encoder(teacher_folder: Path | None, names: tuple[str, ...], where: str) -> tuple:
    """The tokenizer(s) and text encoder(s) in the pipeline folder's sub-folders ``names`` (tokenizer,
    encoder, tokenizer, encoder, ...), each encoder as the class its config's ``architectures`` names
    (a CLIPTextModelWithProjection keeps its projection)."""
    folders = [None if teacher_folder is None else Path(teacher_folder) / name for name in names]
    if any(folder is None or not folder.is_dir() for folder in folders):
        wanted = [f"{name}/" for name in names]
        wanted = f"{', '.join(wanted[:-1])} and {wanted[-1]}"
        states = STATES_KEY if len(names) == 2 else f"{STATES_KEY}, {' and '.join(ADDED_KEYS)}"
        raise ConditionsError(f"{where}: the teacher {teacher_folder or ''} has no {wanted} (a pipeline folder's) "
                              f"to encode them; pass pre-computed conditions (a safetensors file with {states})")
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        loaded = []
        for tokenizer_folder, encoder_folder in zip(folders[0::2], folders[1::2]):
            loaded.append(AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True))
            architectures = AutoConfig.from_pretrained(encoder_folder, local_files_only=True).architectures or []
            model_class = getattr(transformers, architectures[0], AutoModel) if architectures else AutoModel
            loaded.append(model_class.from_pretrained(encoder_folder, local_files_only=True).eval())
    except (ImportError, OSError, ValueError, KeyError) as error:
        raise ConditionsError(f"cannot load the teacher's text encoder and tokenizer in {teacher_folder}: "
                              f"{first_line(error)}") from None
    return tuple(loaded)


def _encode_prompts_xl(prompts: list[str], teacher_folder: Path | None, unet: nn.Module, where: str,
                       batch_size: int) -> RawConditions:
    """As StableDiffusionXLPipeline.encode_prompt (no clip skip, one image per prompt): each prompt
    tokenized by ``tokenizer/`` and ``tokenizer_2/`` (padded to their ``model_max_length``, truncated),
    the penultimate hidden states of ``text_encoder/`` and ``text_encoder_2/`` side by side as the states,
    the first 2-D output (text_encoder_2's projected pooled output) as ``text_embeds``; ``time_ids`` of
    the pipeline's default size (:func:`pixel_size`: original = target, crop (0, 0)). The unconditional
    conditions: zeros where the folder's ``model_index.json`` has ``force_zeros_for_empty_prompt`` (the
    pipeline's default), otherwise the empty prompt's, padded to the states' length; its time ids the same."""
    tokenizer, encoder, tokenizer_2, encoder_2 = _text_encoder(
        teacher_folder, tuple(name for pair in TEXT_ENCODER_FOLDERS for name in pair), where)
    pairs = ((tokenizer, encoder), (tokenizer_2, encoder_2))

    @torch.no_grad()
    def encode(texts: list[str], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], []
        for start in range(0, len(texts), batch_size):
            chunk, parts, first_pooled = texts[start:start + batch_size], [], None
            for tokenizer_, encoder_ in pairs:
                ids = tokenizer_(chunk, padding="max_length", max_length=length or tokenizer_.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
                output = encoder_(ids, output_hidden_states=True)
                if first_pooled is None and output[0].ndim == 2:
                    first_pooled = output[0].float()
                parts.append(output.hidden_states[-2].float())
            if first_pooled is None:
                raise ConditionsError(f"{where}: neither text encoder returns pooled embeddings (text_encoder_2 "
                                      "of an SDXL pipeline is a CLIPTextModelWithProjection); pass pre-computed "
                                      "conditions")
            states.append(torch.cat(parts, dim=-1))
            pooled.append(first_pooled)
        return torch.cat(states), torch.cat(pooled)

    log.info("encoding %d prompts from %s with the teacher's two text encoders", len(prompts), where)
    states, text_embeds = encode(prompts)
    time_dim, width = int(unet.config.addition_time_embed_dim), added_condition_width(unet)
    if width - text_embeds.shape[1] != SDXL_TIME_IDS * time_dim:
        raise ConditionsError(f"{where}: the teacher's add_embedding takes {width} inputs, which is not the pooled "
                              f"embeddings' {text_embeds.shape[1]} + {SDXL_TIME_IDS} time ids x {time_dim} (original "
                              "size, crop, target size); pass pre-computed conditions with its time_ids")
    height, width_px = pixel_size(unet, teacher_folder)
    time_ids = torch.tensor([[height, width_px, 0, 0, height, width_px]], dtype=torch.float32)
    if _force_zeros_for_empty_prompt(teacher_folder):
        negative, negative_text, found = None, None, "zeros (the pipeline's force_zeros_for_empty_prompt)"
    else:
        negative, negative_text = encode([""], length=states.shape[1])
        found = "the empty prompt"
    negative_added = {"time_ids": time_ids} if negative_text is None else {"text_embeds": negative_text,
                                                                          "time_ids": time_ids}
    return RawConditions(states, negative, found, {"text_embeds": text_embeds,
                                                   "time_ids": time_ids.expand(len(prompts), -1)}, negative_added)


def pixel_size(unet: nn.Module, teacher_folder: Path | None) -> tuple[int, int]:
    """The (height, width) in pixels StableDiffusionXLPipeline samples at by default: the UNet's
    ``sample_size`` times the VAE's scale factor, 2 ** (len(vae block_out_channels) - 1) from the
    pipeline folder's ``vae/config.json``, or 8 without one (as the pipeline does)."""
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    factor = 8
    vae_config = None if teacher_folder is None else Path(teacher_folder) / "vae" / "config.json"
    if vae_config is not None and vae_config.is_file():
        channels = _json_object(vae_config).get("block_out_channels")
        if isinstance(channels, (list, tuple)) and channels:
            factor = 2 ** (len(channels) - 1)
    return height * factor, width * factor


def _force_zeros_for_empty_prompt(teacher_folder: Path | None) -> bool:
    """The pipeline folder's ``force_zeros_for_empty_prompt`` (model_index.json; StableDiffusionXLPipeline's
    default, True, where it does not say)."""
    index = None if teacher_folder is None else Path(teacher_folder) / "model_index.json"
    if index is None or not index.is_file():
        return True
    return bool(_json_object(index).get("force_zeros_for_empty_prompt", True))


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConditionsError(f"{path} cannot be read as JSON: {first_line(error)}") from None
    if not isinstance(data, dict):
        raise ConditionsError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data
