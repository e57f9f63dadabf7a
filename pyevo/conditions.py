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
  the encoding of ``""`` in the file (or give prompts), and its guided samples are the pipeline's.

Data-free runs draw the teacher's sampling trajectories from these states (with guidance when
``guidance_scale`` > 1); the evaluation samples teacher and student from the same states and noise.
Under guidance the student is also called at the unconditional states (and the guided prediction
amplifies the difference of its two predictions), so guided runs train and score on both
(:func:`with_unconditional_rows`). Every problem with the file is a one-line :class:`ConditionsError`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from pyevo.diffusion import ImageSet
from pyevo.runfolder import tensor_digest
from pyevo.teacher import cross_attention_dim, first_line, is_text_conditional

log = logging.getLogger(__name__)

STATES_KEY = "encoder_hidden_states"
NEGATIVE_KEY = "negative_encoder_hidden_states"
PROMPTS_SUFFIX = ".txt"


class ConditionsError(ValueError):
    """The conditions a user gave cannot condition the teacher (missing, unreadable, wrongly shaped)."""


@dataclass
class Conditions:
    """N prompts' encoder states [N, L, D] and the unconditional states [1, L, D] (float32, on the CPU)."""

    states: torch.Tensor
    negative: torch.Tensor
    source: str  # the file (or caption folder) they were read from
    unconditional: str = "zeros"  # where the unconditional states came from: zeros, the file, the empty prompt
    prompts: tuple[str, ...] | None = None  # the texts the states encode, where known (prompts, captions)

    def __post_init__(self) -> None:
        if self.states.ndim != 3 or self.negative.shape != (1, *self.states.shape[1:]):
            raise ValueError(f"conditions must be [N, L, D] with negative [1, L, D], got {tuple(self.states.shape)} "
                             f"and {tuple(self.negative.shape)}")
        if self.prompts is not None and len(self.prompts) != len(self.states):
            raise ValueError(f"{len(self.prompts)} prompts for {len(self.states)} rows of states")

    def __len__(self) -> int:
        return len(self.states)

    @property
    def sequence_length(self) -> int:
        return self.states.shape[1]

    def rows(self, count: int) -> torch.Tensor:
        """``count`` rows of states cycling through the N prompts (equal use of each, in file order)."""
        return self.states[torch.arange(count) % len(self.states)]

    def prompt_rows(self, count: int) -> list[str] | None:
        """The prompts of :meth:`rows`' ``count`` rows (None where the states came without their texts)."""
        return None if self.prompts is None else [self.prompts[i % len(self.prompts)] for i in range(count)]

    def digest(self) -> str:
        """A digest of the states and the unconditional states (for stage keys)."""
        return tensor_digest([self.states, self.negative])


def condition_rows(conditions: Conditions | None, count: int) -> torch.Tensor | None:
    """:meth:`Conditions.rows`, or None for a teacher without text conditions."""
    return None if conditions is None else conditions.rows(count)


def warn_of_zero_guidance(conditions: Conditions | None, guidance_scale: float) -> None:
    """A warning when samples will be guided away from zero states that stand in for the empty prompt's."""
    if guidance(conditions, guidance_scale) and conditions.unconditional == "zeros":
        log.warning("guidance %g contrasts with zero states: %s has no %s. A teacher trained on the empty "
                    "prompt's states (Stable Diffusion 1.x) is guided as its pipeline guides it only with those "
                    "states in the file, or with prompts (.txt)", guidance_scale, conditions.source, NEGATIVE_KEY)


def guidance(conditions: Conditions | None, guidance_scale: float) -> dict:
    """The keyword arguments of :func:`pyevo.sample.ddim_sample` for classifier-free guidance: the
    scale and the unconditional states, or nothing when there are no conditions or the scale is <= 1."""
    if conditions is None or guidance_scale <= 1.0:
        return {}
    return {"guidance_scale": guidance_scale, "negative_encoder_hidden_states": conditions.negative}


def with_unconditional_rows(data: ImageSet, negative: torch.Tensor) -> ImageSet:
    """``data`` with every image twice, interleaved: at its own states, then at the unconditional states
    ``negative`` [1, L, D], as a guided sampler calls the UNet at each noisy image. Interleaved, so that
    any prefix (the held-out set's first rows) holds both kinds equally."""
    order = torch.arange(2 * len(data)) // 2
    states = data.encoder_hidden_states[order]  # a copy: indexing by a tensor
    states[1::2] = negative
    return ImageSet(data.images[order], None if data.labels is None else data.labels[order], states)


def load_conditions(path: str, unet: nn.Module, teacher_folder: Path | None = None) -> Conditions | None:
    """The conditions ``path`` holds for ``unet``; None for a UNet without text conditions and no path.

    ``path`` is a safetensors file of states, or a text file of prompts (``.txt``, one a line) that the
    text encoder and tokenizer of the teacher's pipeline folder ``teacher_folder`` encode
    (:func:`encode_prompts`). Raises ConditionsError in one line: a text-conditional UNet without a file,
    a file for a UNet that takes none, a missing or unreadable file, no ``encoder_hidden_states``
    tensor, a tensor that is not [N, L, D] floats, D not the UNet's ``cross_attention_dim``, an
    unconditional tensor of another shape, non-finite values; prompts without a pipeline text encoder.
    """
    conditional = is_text_conditional(unet)
    if not path:
        if conditional:
            raise ConditionsError(f"the teacher is a text-conditional {type(unet).__name__}: pass --conditions FILE "
                                  f"(a safetensors file with {STATES_KEY} [N, L, {cross_attention_dim(unet)}], or "
                                  "a .txt file of prompts for the teacher pipeline's text encoder)")
        return None
    if not conditional:
        raise ConditionsError(f"--conditions {path}: the teacher is a {type(unet).__name__}, which takes no text "
                              "conditions (encoder_hidden_states)")
    where = Path(path).expanduser()
    if not where.is_file():
        raise ConditionsError(f"conditions file not found: {where}")
    prompts = None
    if where.suffix == PROMPTS_SUFFIX:
        prompts = read_prompts(where)
        states, negative = encode_prompts(prompts, teacher_folder, f"prompts file {where}")
        found = "the empty prompt"
    else:
        states, negative = _read_states(where)
        found = "the file" if negative is not None else "zeros"
    return _checked(states, negative, unet, where, found, prompts)


def _read_states(where: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        tensors = safetensors.torch.load_file(where)
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as error:
        raise ConditionsError(f"conditions file {where} is not a readable safetensors file: "
                              f"{first_line(error)}") from None
    if STATES_KEY not in tensors:
        raise ConditionsError(f"conditions file {where} has no tensor {STATES_KEY!r} (it has "
                              f"{', '.join(sorted(tensors)) or 'none'})")
    return tensors[STATES_KEY], tensors.get(NEGATIVE_KEY)


def _checked(states: torch.Tensor, negative: torch.Tensor | None, unet: nn.Module, where: Path,
             found: str, prompts: list[str] | None = None) -> Conditions:
    """The states and unconditional states (zeros when None; ``found`` says where they came from),
    checked against the UNet."""
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
    if not bool(torch.isfinite(states).all() and torch.isfinite(negative).all()):
        raise ConditionsError(f"conditions file {where} holds non-finite values")
    log.info("conditions: %d prompts' states [%d, %d] from %s; unconditional states: %s", len(states),
             states.shape[1], dim, where, found)
    return Conditions(states, negative, str(where), found, None if prompts is None else tuple(prompts))


def caption_conditions(captions: list[str], unet: nn.Module, teacher_folder: Path | None, where: Path) -> Conditions:
    """The states of an image folder's captions (one row per image, in order) and the empty prompt's,
    encoded by the teacher pipeline's text encoder (:func:`encode_prompts`) and checked against the UNet."""
    states, negative = encode_prompts(captions, teacher_folder, f"the captions of {where}")
    return _checked(states, negative, unet, where, "the empty prompt", captions)


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
                   batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts``' states [N, L, D] and the empty prompt's [1, L, D], from the ``tokenizer/`` and
    ``text_encoder/`` of the pipeline folder ``teacher_folder`` (local files only), encoded as
    StableDiffusionPipeline.encode_prompt encodes them: padded to the tokenizer's ``model_max_length``,
    truncated, the text encoder's last hidden states (with an attention mask where its config asks)."""
    folders = {name: None if teacher_folder is None else Path(teacher_folder) / name
               for name in ("tokenizer", "text_encoder")}
    if any(folder is None or not folder.is_dir() for folder in folders.values()):
        raise ConditionsError(f"{where}: the teacher {teacher_folder or ''} has no tokenizer/ and "
                              "text_encoder/ (a pipeline folder's) to encode them; pass pre-computed states "
                              f"(a safetensors file with {STATES_KEY})")
    try:
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folders["tokenizer"], local_files_only=True)
        text_encoder = AutoModel.from_pretrained(folders["text_encoder"], local_files_only=True).eval()
    except (ImportError, OSError, ValueError, KeyError) as error:
        raise ConditionsError(f"cannot load the teacher's text encoder and tokenizer in {teacher_folder}: "
                              f"{first_line(error)}") from None
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
    return encode(prompts), encode([""])
