"""SDXL-shaped teachers: a random-init UNet2DConditionModel of SDXL's config at tiny width (addition_embed_type
"text_time": added_cond_kwargs text_embeds [B, P] and time_ids [B, 6]; several transformer layers per block; linear
projections), saved by the tests themselves. The added conditions reach the blocks through temb; the supernet's
teacher-shaped path and the exported student are the teacher; ddim_sample's guided loop is StableDiffusionXLPipeline's;
prompts are encoded as its encode_prompt encodes them (two tiny CLIPs); conditions files are checked; the whole CLI
runs data-free and the student generates through StableDiffusionXLPipeline."""
import json
import re

import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from pyevo.conditions import ConditionsError, load_conditions
from pyevo.sample import ddim_sample
from pyevo.teacher import conditioning, record_blocks
from tests.test_conditional_teachers import TEXT_DIM, write_tiny_clip
from tests.test_latent_teachers import IMAGE_SIZE, tiny_kl
from tests.test_real_teachers import cli
from tests.unet_configs import SDXL_CONFIG, SDXL_POOLED_DIM, SDXL_SMALL_CONFIG, SDXL_TEXT_DIM

SEQUENCE = 5
TIME_IDS = [IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]  # the tiny VAE's 16 px images: 8 x 8 latents


def sdxl_unet(seed: int = 0, **extra) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**SDXL_SMALL_CONFIG, **extra}).eval()


def sdxl_inputs(batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=generator)
    states = torch.randn(batch, SEQUENCE, SDXL_TEXT_DIM, generator=generator)
    added = {"text_embeds": torch.randn(batch, SDXL_POOLED_DIM, generator=generator),
             "time_ids": torch.tensor([TIME_IDS], dtype=torch.float32).expand(batch, -1)}
    return sample, states, added


def write_sdxl_conditions(path, prompts: int = 3, **overrides) -> dict:
    generator = torch.Generator().manual_seed(5)
    tensors = {"encoder_hidden_states": torch.randn(prompts, SEQUENCE, SDXL_TEXT_DIM, generator=generator),
               "negative_encoder_hidden_states": 0.1 * torch.randn(1, SEQUENCE, SDXL_TEXT_DIM, generator=generator),
               "text_embeds": torch.randn(prompts, SDXL_POOLED_DIM, generator=generator),
               "negative_text_embeds": 0.1 * torch.randn(1, SDXL_POOLED_DIM, generator=generator),
               "time_ids": torch.tensor([TIME_IDS] * prompts, dtype=torch.float32)}
    tensors = {key: value for key, value in {**tensors, **overrides}.items() if value is not None}
    safetensors.torch.save_file(tensors, path)
    return tensors


def xl_pipeline(unet, scheduler, folder=None):
    """A StableDiffusionXLPipeline of local parts: the tiny VAE, and the tiny CLIPs in ``folder`` (or none:
    the prompts come as their embeddings)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts = dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    if folder is not None:
        parts = dict(text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
                     text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
                     tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                     tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"))
    return StableDiffusionXLPipeline(vae=tiny_kl(), unet=unet, scheduler=scheduler, add_watermarker=False, **parts)


# ------------------------------------------------------------------------- the UNet, its blocks, supernet, student
def test_sdxl_configs_build_and_every_block_is_searchable():
    from pyevo.space import unet_space

    with torch.device("meta"):
        full = UNet2DConditionModel(**SDXL_CONFIG)
    assert round(sum(p.numel() for p in full.parameters()) / 1e6) == 2567  # SDXL base's 2.57 B
    for unet in (full, sdxl_unet()):
        spaces = unet_space(unet)
        assert [s.block_type for s in spaces] == [
            "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn",
            "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
        layers = [[t.layers for t in s.transformers] for s in spaces]
        expected = [[], [2, 2], [10, 10], [10], [10] * 3, [2] * 3, []] if unet is full else \
            [[], [2], [3], [3], [3, 3], [2, 2], []]
        assert layers == expected


def test_added_conditions_reach_the_blocks_through_temb_and_the_teacher_shaped_paths_are_the_teacher():
    """UNet2DConditionModel adds the embedded text_embeds and time_ids to temb before any block runs, so the
    recorded calls carry them there (no block takes added_cond_kwargs); the super-blocks' and the exported
    student's teacher-shaped paths reproduce the teacher from those calls and those inputs."""
    from pyevo.distill import block_nsr
    from pyevo.student import StudentUNet2DConditionModel
    from pyevo.supernet import build_supernet, supernet_unet

    teacher = sdxl_unet().double()
    sample, states, added = sdxl_inputs(2)
    sample, states = sample.double(), states.double()
    added = {key: value.double() for key, value in added.items()}
    timesteps = torch.tensor([10, 700])
    calls, prediction = record_blocks(teacher, sample, timesteps, None, states, added)
    torch.testing.assert_close(prediction, teacher(sample, timesteps, encoder_hidden_states=states,
                                                   added_cond_kwargs=added).sample)
    assert all("added_cond_kwargs" not in call.kwargs for call in calls.values())
    other = {**added, "text_embeds": added["text_embeds"] + 1.0}
    moved = record_blocks(teacher, sample, timesteps, None, states, other)[0]
    temb = calls["down_blocks.0"].kwargs["temb"]
    assert not torch.allclose(temb, moved["down_blocks.0"].kwargs["temb"])
    expected = teacher.time_embedding(teacher.time_proj(timesteps).double()) + teacher.add_embedding(torch.cat(
        [added["text_embeds"], teacher.add_time_proj(added["time_ids"].flatten()).reshape(2, -1)], dim=-1))
    torch.testing.assert_close(temb, expected)

    supernet = build_supernet(teacher)
    for name in supernet.names:
        assert block_nsr(supernet[name], calls[name]) < 1e-20, name
    torch.testing.assert_close(supernet_unet(teacher, supernet)(
        sample, timesteps, **conditioning(teacher, None, states, added)).sample, prediction, rtol=0, atol=1e-12)
    student = StudentUNet2DConditionModel.from_supernet(teacher, supernet, supernet.network_genome())
    torch.testing.assert_close(student(sample, timesteps, encoder_hidden_states=states,
                                       added_cond_kwargs=added).sample, prediction, rtol=0, atol=1e-12)
    # Another genome: the student computes what the supernet computes for it.
    import random

    rng = random.Random(1)
    genomes = {name: supernet.spaces[name].random_genome(rng) for name in supernet.names}
    supernet.set_genome(genomes)
    student = StudentUNet2DConditionModel.from_supernet(teacher, supernet, genomes)
    torch.testing.assert_close(student(sample, timesteps, encoder_hidden_states=states, added_cond_kwargs=added).sample,
                               supernet_unet(teacher, supernet)(sample, timesteps, encoder_hidden_states=states,
                                                                added_cond_kwargs=added).sample, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="needs added_cond_kwargs with text_embeds and time_ids"):
        conditioning(teacher, None, states)


# ------------------------------------------------------------------------------------------- sampling, prompts
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_guided_ddim_sample_is_stable_diffusion_xl_pipelines_denoising_loop(guidance_scale):
    """Same noise, states, pooled embeddings, time ids, schedule and steps: ddim_sample's latents are
    StableDiffusionXLPipeline's (its default size: the UNet's sample size x the VAE's scale factor)."""
    unet = sdxl_unet()
    scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1)
    _, states, added = sdxl_inputs(2, seed=3)
    generator = torch.Generator().manual_seed(4)
    negative = torch.randn(1, SEQUENCE, SDXL_TEXT_DIM, generator=generator)
    negative_added = {"text_embeds": torch.randn(1, SDXL_POOLED_DIM, generator=generator),
                      "time_ids": added["time_ids"][:1]}
    expected = xl_pipeline(unet, scheduler)(
        prompt_embeds=states, pooled_prompt_embeds=added["text_embeds"],
        negative_prompt_embeds=negative.expand(2, -1, -1),
        negative_pooled_prompt_embeds=negative_added["text_embeds"].expand(2, -1), guidance_scale=guidance_scale,
        num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(11)).images
    guided = {} if guidance_scale <= 1 else {"guidance_scale": guidance_scale, "negative_encoder_hidden_states": negative,
                                              "negative_added_cond_kwargs": negative_added}
    actual = ddim_sample(unet, scheduler.config, 2, steps=4, seed=11, progress=False, clip_output=False,
                         encoder_hidden_states=states, added_cond_kwargs=added, **guided)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="added_cond_kwargs are needed exactly when"):
        ddim_sample(unet, scheduler.config, 2, steps=1, progress=False, encoder_hidden_states=states)


def write_xl_text_encoders(folder) -> None:
    """An SDXL pipeline folder's tokenizer/ + text_encoder/ and tokenizer_2/ + text_encoder_2/ (tiny CLIPs of
    width 16 each: states of width SDXL_TEXT_DIM; the second projects its pooled output to SDXL_POOLED_DIM)."""
    assert 2 * TEXT_DIM == SDXL_TEXT_DIM and TEXT_DIM == SDXL_POOLED_DIM
    write_tiny_clip(folder, layers=2)
    write_tiny_clip(folder, suffix="_2", projection=True, layers=2, seed=6)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_prompts_are_encoded_as_stable_diffusion_xl_encodes_them(tmp_path, force_zeros):
    pipeline = tmp_path / "pipeline"
    write_xl_text_encoders(pipeline)
    tiny_kl().save_pretrained(pipeline / "vae")  # its scale factor sizes the time ids
    if not force_zeros:
        (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                               "force_zeros_for_empty_prompt": False}))
    texts = ["lower newer", "wider lowest", "low"]
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    unet = sdxl_unet()
    conditions = load_conditions(str(tmp_path / "prompts.txt"), unet, pipeline)
    pipe = xl_pipeline(unet, DDIMScheduler(), pipeline)
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    states, negative, pooled, negative_pooled = pipe.encode_prompt(texts, device="cpu", num_images_per_prompt=1,
                                                                   do_classifier_free_guidance=True)
    torch.testing.assert_close(conditions.states, states)
    torch.testing.assert_close(conditions.added["text_embeds"], pooled)
    torch.testing.assert_close(conditions.negative, negative[:1])
    torch.testing.assert_close(conditions.negative_added["text_embeds"], negative_pooled[:1])
    assert bool(negative.abs().sum() == 0) == force_zeros
    time_ids = pipe._get_add_time_ids((IMAGE_SIZE, IMAGE_SIZE), (0, 0), (IMAGE_SIZE, IMAGE_SIZE), torch.float32,
                                      text_encoder_projection_dim=SDXL_POOLED_DIM)
    torch.testing.assert_close(conditions.added["time_ids"], time_ids.expand(3, -1))
    torch.testing.assert_close(conditions.negative_added["time_ids"], time_ids)
    assert conditions.prompt_rows(4) == [*texts, texts[0]]
    # An SD pipeline folder (one text encoder) cannot encode them for this UNet.
    one = tmp_path / "one"
    write_tiny_clip(one)
    with pytest.raises(ConditionsError, match=re.escape("has no tokenizer/, text_encoder/, tokenizer_2/ and "
                                                        "text_encoder_2/")):
        load_conditions(str(tmp_path / "prompts.txt"), unet, one)


def test_conditions_files_carry_and_check_the_added_conditions(tmp_path):
    from pyevo.conditions import guidance, with_unconditional_rows
    from pyevo.diffusion import ImageSet
    from tests.test_conditional_teachers import text_unet, write_conditions

    unet = sdxl_unet()
    path = tmp_path / "c.safetensors"
    tensors = write_sdxl_conditions(path, negative_text_embeds=None)
    conditions = load_conditions(str(path), unet)
    assert torch.equal(conditions.added["text_embeds"], tensors["text_embeds"])
    assert torch.equal(conditions.added_rows(4)["text_embeds"], tensors["text_embeds"][[0, 1, 2, 0]])
    # No negative text_embeds: zeros (force_zeros_for_empty_prompt); no negative time ids: the rows' own.
    assert torch.equal(conditions.negative_added["text_embeds"], torch.zeros(1, SDXL_POOLED_DIM))
    assert conditions.negative_added["time_ids"].tolist() == [TIME_IDS]
    assert guidance(conditions, 2.0)["negative_added_cond_kwargs"] is conditions.negative_added
    rows = ImageSet(torch.zeros(2, 4, 8, 8), None, conditions.rows(2), conditions.added_rows(2))
    doubled = with_unconditional_rows(rows, conditions.negative, conditions.negative_added)
    assert torch.equal(doubled.added_cond_kwargs["text_embeds"][0::2], tensors["text_embeds"][:2])
    assert not doubled.added_cond_kwargs["text_embeds"][1::2].any()
    first = conditions.digest()
    write_sdxl_conditions(path)
    assert load_conditions(str(path), unet).digest() != first  # the added conditions are in the stage keys
    for overrides, message in [
        ({"text_embeds": None}, "takes added_cond_kwargs, and the file has no text_embeds"),
        ({"time_ids": None, "text_embeds": None}, "has no text_embeds or time_ids"),
        ({"text_embeds": torch.zeros(3, SDXL_POOLED_DIM + 1)},
         f"make {SDXL_POOLED_DIM + 1} + 6 x 8 = {SDXL_POOLED_DIM + 49} inputs to the teacher's add_embedding, which "
         f"takes projection_class_embeddings_input_dim = {SDXL_POOLED_DIM + 48}"),
        ({"time_ids": torch.zeros(2, 6)}, "time_ids must be [N, W] numbers with N = 3 rows"),
        ({"time_ids": torch.tensor([TIME_IDS, TIME_IDS, [8, 8, 0, 0, 8, 8]], dtype=torch.float32)},
         "time_ids differ between rows, so the unconditional rows' cannot be theirs: give negative_time_ids [1, 6]"),
        ({"negative_text_embeds": torch.zeros(1, 3)}, f"negative_text_embeds must be [1, {SDXL_POOLED_DIM}]"),
        ({"text_embeds": torch.full((3, SDXL_POOLED_DIM), float("inf"))}, "holds non-finite values"),
    ]:
        write_sdxl_conditions(path, **overrides)
        with pytest.raises(ConditionsError, match=re.escape(message)):
            load_conditions(str(path), unet)
    # Rows of several sizes with their own unconditional time ids are fine.
    varied = torch.tensor([TIME_IDS, TIME_IDS, [8, 8, 0, 0, 8, 8]], dtype=torch.float32)
    write_sdxl_conditions(path, time_ids=varied, negative_time_ids=torch.tensor(TIME_IDS, dtype=torch.float32))
    assert load_conditions(str(path), unet).negative_added["time_ids"].shape == (1, 6)
    # A Stable-Diffusion-shaped teacher takes no added conditions.
    write_conditions(path)
    sd = load_conditions(str(path), text_unet())
    assert sd.added is None and "negative_added_cond_kwargs" not in guidance(sd, 2.0)
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file({**tensors, "text_embeds": torch.zeros(3, 4)}, path)
    with pytest.raises(ConditionsError, match="holds text_embeds: added conditions .* it takes none"):
        load_conditions(str(path), text_unet())


# ------------------------------------------------------------------------------------------------- the whole CLI
@pytest.fixture(scope="module")
def sdxl_teacher(tmp_path_factory):
    """An SDXL-shaped pipeline folder (unet/, vae/, scheduler/, the two tiny CLIPs) and an embeddings file."""
    root = tmp_path_factory.mktemp("sdxl_teacher")
    sdxl_unet().save_pretrained(root / "pipeline" / "unet")
    tiny_kl().save_pretrained(root / "pipeline" / "vae")
    DDPMScheduler(num_train_timesteps=100, clip_sample=False).save_pretrained(root / "pipeline" / "scheduler")
    write_xl_text_encoders(root / "pipeline")
    write_sdxl_conditions(root / "conditions.safetensors")
    return root


def test_sdxl_teacher_runs_end_to_end_and_its_student_generates_through_stable_diffusion_xl(sdxl_teacher, tmp_path):
    import pyevo

    out = tmp_path / "run"
    pipeline = sdxl_teacher / "pipeline"
    result = cli("--teacher", str(pipeline), "--data", "data-free", "--conditions",
                 str(sdxl_teacher / "conditions.safetensors"), "--guidance-scale", "2.5", "--out", str(out),
                 "--metric-features", "none", f"--set=latency.cache={tmp_path / 'lat.json'}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["text_conditional"] and report["guidance_scale"] == 2.5
    assert set(report["blocks"]) == {"down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0",
                                     "up_blocks.1", "up_blocks.2"}
    assert "t0:" in report["student"]["genome"].split("mid_block=")[1].split(";")[0]
    assert report["student"]["psnr_vs_teacher"] is not None and report["student"]["latency_ms"] > 0
    samples = safetensors.torch.load_file(out / "samples.safetensors")
    assert samples["student"].shape == samples["teacher"].shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)

    # The exported student reloads as its class and is a drop-in unet for StableDiffusionXLPipeline: called with
    # prompt and pooled embeddings (and negative ones), the pipeline's latents are pyevo's guided sampler's.
    student = pyevo.load_student(out / "student")
    assert type(student).__name__ == "StudentUNet2DConditionModel" and student.config.addition_embed_type == "text_time"
    scheduler = DDIMScheduler.from_pretrained(pipeline / "scheduler", steps_offset=1)
    conditions = load_conditions(str(sdxl_teacher / "conditions.safetensors"), student)
    pipe = xl_pipeline(student, scheduler)
    latents = pipe(prompt_embeds=conditions.states[:2], pooled_prompt_embeds=conditions.added["text_embeds"][:2],
                   negative_prompt_embeds=conditions.negative.expand(2, -1, -1),
                   negative_pooled_prompt_embeds=conditions.negative_added["text_embeds"].expand(2, -1),
                   guidance_scale=2.5, num_inference_steps=3, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    expected = ddim_sample(student, scheduler.config, 2, steps=3, seed=0, progress=False, clip_output=False,
                           encoder_hidden_states=conditions.rows(2), added_cond_kwargs=conditions.added_rows(2),
                           guidance_scale=2.5, negative_encoder_hidden_states=conditions.negative,
                           negative_added_cond_kwargs=conditions.negative_added)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)
    images = pipe(prompt_embeds=conditions.states[:2], pooled_prompt_embeds=conditions.added["text_embeds"][:2],
                  guidance_scale=1.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_bad_inputs_for_sdxl_teachers_are_one_line_refusals(sdxl_teacher, tmp_path, capsys):
    from tests.test_conditional_teachers import _refused

    out = tmp_path / "run"
    pipeline = str(sdxl_teacher / "pipeline")
    _refused(capsys, out, f"encoder_hidden_states [N, L, {SDXL_TEXT_DIM}], text_embeds [N, ...], time_ids [N, ...]",
             "--teacher", pipeline, "--data", "data-free")
    no_pooled = tmp_path / "no_pooled.safetensors"
    write_sdxl_conditions(no_pooled, text_embeds=None)
    _refused(capsys, out, "takes added_cond_kwargs, and the file has no text_embeds", "--teacher", pipeline,
             "--data", "data-free", "--conditions", str(no_pooled))


def test_captions_of_an_sdxl_teacher_carry_their_added_conditions_into_the_latents_cache(sdxl_teacher, tmp_path):
    """A caption folder's captions are encoded by the two text encoders (states and text_embeds per image), and
    the latents cache keeps each set's added conditions beside its states."""
    from pyevo.autoencoder import LatentCodec
    from pyevo.conditions import caption_conditions, encode_prompts
    from pyevo.diffusion import ImageSet
    from pyevo.pipeline import encode_images, read_latents

    pipeline = sdxl_teacher / "pipeline"
    unet = sdxl_unet()
    captions = ["lower newer", "wider", "low"]
    conditions = caption_conditions(captions, unet, pipeline, tmp_path)
    encoded = encode_prompts(captions, pipeline, unet=unet)
    assert torch.equal(conditions.added["text_embeds"], encoded.added["text_embeds"])
    assert conditions.added["time_ids"].tolist() == [TIME_IDS] * 3 and conditions.prompts == tuple(captions)
    images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sets = {"train": ImageSet(images, None, conditions.states, conditions.added)}
    written = encode_images(LatentCodec(tiny_kl()), sets, "mode", 0, tmp_path / "latents.safetensors")
    read = read_latents(tmp_path / "latents.safetensors", ["train"])["train"]
    for key in ("text_embeds", "time_ids"):
        assert torch.equal(read.added_cond_kwargs[key], conditions.added[key])
        assert torch.equal(written["train"].added_cond_kwargs[key], conditions.added[key])
    assert torch.equal(read.subset(slice(1, None)).added_cond_kwargs["text_embeds"], conditions.added["text_embeds"][1:])


def test_sample_cli_samples_an_sdxl_teacher_at_its_conditions(sdxl_teacher, tmp_path):
    from PIL import Image

    from pyevo.sample import main as sample_main

    (tmp_path / "prompts.txt").write_text("lower newer\nwider\n")  # for the pipeline's two text encoders
    grid = tmp_path / "grid.png"
    sample_main(["--teacher", str(sdxl_teacher / "pipeline"), "--conditions", str(tmp_path / "prompts.txt"), "--n",
                 "2", "--steps", "2", "--guidance_scale", "2", "--out", str(grid)])
    assert Image.open(grid).mode == "RGB"  # decoded by the pipeline's VAE
