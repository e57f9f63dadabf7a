"""Text-conditional teachers: a random-init Stable-Diffusion-shaped UNet2DConditionModel (cross-attention
transformers of two heads) with a tiny AutoencoderKL and an embeddings file, all saved by the test itself.
The whole CLI data-free; the student reloads in a fresh process (pyevo.load_student) and generates through
StableDiffusionPipeline called with prompt_embeds; the guided sampler against StableDiffusionPipeline's own
loop; bad inputs refused in one line with nothing written. (Teacher-shaped exactness of the
SD-v1.5-config supernet is tests/test_transformer_space.py's.)"""
import json
import re

import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from pyevo.conditions import ConditionsError, load_conditions
from pyevo.sample import ddim_sample
from pyevo.search.__main__ import main
from tests.test_latent_teachers import IMAGE_SIZE, tiny_kl
from tests.test_real_teachers import cli, fresh_process, small_unet, write_images

TEXT_DIM = 16
SEQUENCE = 5
TEXT_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 attention_head_dim=2,  # UNet2DConditionModel's name for the number of heads: 2 per transformer
                 cross_attention_dim=TEXT_DIM, norm_num_groups=8)


def text_unet(**extra) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**{**TEXT_UNET, **extra}).eval()


def write_captions(folder) -> None:
    """A caption name.txt beside every name.png, from the tiny CLIP's vocabulary."""
    words = ("lower newer", "wider", "lowest low", "newer")
    for index, image in enumerate(sorted(folder.glob("*.png"))):
        image.with_suffix(".txt").write_text(words[index % len(words)] + "\n")


def write_conditions(path, prompts: int = 3, dim: int = TEXT_DIM, negative: bool = True) -> None:
    generator = torch.Generator().manual_seed(5)
    tensors = {"encoder_hidden_states": torch.randn(prompts, SEQUENCE, dim, generator=generator)}
    if negative:
        tensors["negative_encoder_hidden_states"] = 0.1 * torch.randn(1, SEQUENCE, dim, generator=generator)
    safetensors.torch.save_file(tensors, path)


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory):
    """A Stable-Diffusion-shaped pipeline folder (unet/, vae/, scheduler/, tokenizer/, text_encoder/), an
    embeddings file and a prompts file."""
    root = tmp_path_factory.mktemp("text_teacher")
    text_unet().save_pretrained(root / "pipeline" / "unet")
    tiny_kl().save_pretrained(root / "pipeline" / "vae")
    DDPMScheduler(num_train_timesteps=100, clip_sample=False).save_pretrained(root / "pipeline" / "scheduler")
    write_tiny_clip(root / "pipeline")
    write_conditions(root / "prompts.safetensors")
    (root / "prompts.txt").write_text("lower newer\nwider\n")
    return root


def test_text_conditional_teacher_runs_end_to_end_and_its_student_generates_through_stable_diffusion(
        text_teacher, tmp_path):
    out = tmp_path / "run"
    write_tiny_clip_model(tmp_path / "clip")
    clip = f"--set=evaluate.clip_model={tmp_path / 'clip'}"
    result = cli("--teacher", str(text_teacher / "pipeline"), "--data", "data-free", "--conditions",
                 str(text_teacher / "prompts.safetensors"), "--guidance-scale", "2.5", "--out", str(out),
                 "--metric-features", "none", f"--set=latency.cache={tmp_path / 'lat.json'}", clip)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["text_conditional"] and report["guidance_scale"] == 2.5 and not report["class_conditional"]
    # States without their texts: no CLIP score, and the report says why.
    assert "clip_score" not in report["student"] and "states without their prompts" in report["clip"]["note"]
    assert "text-conditional (guidance scale 2.5)" in (out / "report.md").read_text()
    assert set(report["blocks"]) == {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"}
    # The cross-attention blocks' genomes name their transformers.
    assert "t0:" in report["student"]["genome"].split("down_blocks.0=")[1].split(";")[0]
    assert report["student"]["psnr_vs_teacher"] is not None
    samples = safetensors.torch.load_file(out / "samples.safetensors")
    assert samples["student"].shape == samples["teacher"].shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert json.loads((out / "student" / "config.json").read_text())["_class_name"] == "StudentUNet2DConditionModel"
    # Resumed, every stage is read back (the conditions are in the keys) and the run ends the same.
    resumed = cli("--teacher", str(text_teacher / "pipeline"), "--data", "data-free", "--conditions",
                  str(text_teacher / "prompts.safetensors"), "--guidance-scale", "2.5", "--out", str(out),
                  "--metric-features", "none", f"--set=latency.cache={tmp_path / 'lat.json'}", clip, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((out / "report.json").read_text())
    assert again["stages"] == report["stages"] and again["student"]["genome"] == report["student"]["genome"]

    pipeline = text_teacher / "pipeline"
    stdout = fresh_process(f"""
        import torch, pyevo, safetensors.torch
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        student = pyevo.load_student({str(out / "student")!r})
        assert type(student).__name__ == "StudentUNet2DConditionModel", type(student)
        assert isinstance(student, UNet2DConditionModel)
        teacher = UNet2DConditionModel.from_pretrained({str(pipeline / "unet")!r})
        vae = AutoencoderKL.from_pretrained({str(pipeline / "vae")!r})
        scheduler = DDIMScheduler.from_pretrained({str(pipeline / "scheduler")!r})
        conditions = safetensors.torch.load_file({str(text_teacher / "prompts.safetensors")!r})
        prompts = conditions["encoder_hidden_states"][:2]
        negative = conditions["negative_encoder_hidden_states"].expand(2, -1, -1)
        shapes = []
        for unet in (teacher, student):
            # No text encoder or tokenizer: the prompts come as their states.
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            images = pipe(prompt_embeds=prompts, negative_prompt_embeds=negative, guidance_scale=2.5,
                          num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
            assert images.shape == (2, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), images.shape
            shapes.append(images.shape)
        print("shapes", shapes)
    """)
    assert "shapes" in stdout


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_guided_ddim_sample_is_stable_diffusion_pipelines_denoising_loop(guidance_scale):
    """Same noise, states, schedule and steps: ddim_sample's latents are StableDiffusionPipeline's."""
    from diffusers import StableDiffusionPipeline

    unet, vae = text_unet(), tiny_kl()
    # steps_offset=1: StableDiffusionPipeline rewrites any other value in its scheduler's config.
    scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1)
    generator = torch.Generator().manual_seed(3)
    states = torch.randn(2, SEQUENCE, TEXT_DIM, generator=generator)
    negative = torch.randn(1, SEQUENCE, TEXT_DIM, generator=generator)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    expected = pipe(prompt_embeds=states, negative_prompt_embeds=negative.expand(2, -1, -1),
                    guidance_scale=guidance_scale, num_inference_steps=4, output_type="latent",
                    generator=torch.Generator().manual_seed(11)).images
    guided = {} if guidance_scale <= 1 else {"guidance_scale": guidance_scale,
                                              "negative_encoder_hidden_states": negative}
    actual = ddim_sample(unet, scheduler.config, 2, steps=4, seed=11, progress=False, clip_output=False,
                         encoder_hidden_states=states, **guided)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_data_free_sets_carry_the_prompts_and_under_guidance_the_unconditional_states(text_teacher, guidance_scale):
    from pyevo.config import RunConfig, SearchConfig
    from pyevo.pipeline import load_images, training_sets
    from pyevo.teacher import load_teacher

    teacher, scheduler = load_teacher(str(text_teacher / "pipeline"))
    conditions = load_conditions(str(text_teacher / "prompts.safetensors"), teacher)
    config = RunConfig(data="data-free", guidance_scale=guidance_scale, search=SearchConfig(heldout_size=4))
    train, heldout, reference, same = load_images(config, teacher, scheduler, None, conditions)
    assert same is conditions
    train, heldout = training_sets(train, heldout, conditions, guidance_scale)
    # 4 x heldout_size trajectories, each prompt in turn; the last heldout_size are held out.
    prompts = conditions.rows(16)
    if guidance_scale <= 1:
        assert len(train) == 12 and len(heldout) == 4 and reference is None
        assert torch.equal(train.encoder_hidden_states, prompts[:12])
        assert torch.equal(heldout.encoder_hidden_states, prompts[12:])
        return
    # Guided: every image twice, at its prompt's states and at the unconditional ones, interleaved.
    assert len(train) == 24 and len(heldout) == 8
    for part, rows in ((train, prompts[:12]), (heldout, prompts[12:])):
        assert torch.equal(part.images[0::2], part.images[1::2])
        assert torch.equal(part.encoder_hidden_states[0::2], rows)
        assert torch.equal(part.encoder_hidden_states[1::2], conditions.negative.expand(len(rows), -1, -1))


def test_conditions_file_is_read_and_checked(tmp_path, caplog):
    from pyevo.conditions import warn_of_zero_guidance

    unet = text_unet()
    path = tmp_path / "c.safetensors"
    write_conditions(path, negative=False)
    conditions = load_conditions(str(path), unet)
    assert conditions.states.shape == (3, SEQUENCE, TEXT_DIM) and conditions.sequence_length == SEQUENCE
    assert torch.equal(conditions.negative, torch.zeros(1, SEQUENCE, TEXT_DIM))  # no negative in the file: zeros
    assert conditions.unconditional == "zeros"
    with caplog.at_level("WARNING", logger="pyevo.conditions"):
        warn_of_zero_guidance(conditions, 1.0)  # no guidance: nothing to say
        warn_of_zero_guidance(conditions, 7.5)
    assert len(caplog.records) == 1 and "guidance 7.5 contrasts with zero states" in caplog.text
    assert torch.equal(conditions.rows(5), conditions.states[[0, 1, 2, 0, 1]])  # each prompt in turn
    safetensors.torch.save_file({"encoder_hidden_states": torch.zeros(2, SEQUENCE, TEXT_DIM),
                                 "negative_encoder_hidden_states": torch.zeros(SEQUENCE, TEXT_DIM)}, path)
    assert load_conditions(str(path), unet).negative.shape == (1, SEQUENCE, TEXT_DIM)
    for tensors, message in [
        ({"prompts": torch.zeros(2, SEQUENCE, TEXT_DIM)}, "has no tensor 'encoder_hidden_states' (it has prompts)"),
        ({"encoder_hidden_states": torch.zeros(2, TEXT_DIM)}, "must be a non-empty float tensor [N, L, D]"),
        ({"encoder_hidden_states": torch.zeros(2, SEQUENCE, TEXT_DIM),
          "negative_encoder_hidden_states": torch.zeros(1, SEQUENCE + 1, TEXT_DIM)}, "must be [1, L, D]"),
        ({"encoder_hidden_states": torch.full((2, SEQUENCE, TEXT_DIM), float("nan"))}, "non-finite values"),
    ]:
        safetensors.torch.save_file(tensors, path)
        with pytest.raises(ConditionsError, match=re.escape(message)):
            load_conditions(str(path), unet)
    path.write_text("not safetensors")
    with pytest.raises(ConditionsError, match="is not a readable safetensors file"):
        load_conditions(str(path), unet)
    with pytest.raises(ConditionsError, match="takes no text conditions"):
        load_conditions(str(path), small_unet(3))
    assert load_conditions("", small_unet(3)) is None


def _refused(capsys, out, message, *args):
    code = main(["--quiet", "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("pyevo.search: error: ") and message in err[0], err
    assert not out.exists()


def test_bad_inputs_for_text_conditional_teachers_are_one_line_refusals(text_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    pipeline = str(text_teacher / "pipeline")
    _refused(capsys, out, "text-conditional UNet2DConditionModel: pass --conditions FILE (a safetensors file with "
             f"encoder_hidden_states [N, L, {TEXT_DIM}], or a .txt file of prompts", "--teacher", pipeline, "--data",
             "data-free")
    wrong = tmp_path / "wrong.safetensors"
    write_conditions(wrong, dim=8)
    _refused(capsys, out, f"encoder_hidden_states has D = 8, but the teacher's cross_attention_dim is {TEXT_DIM}",
             "--teacher", pipeline, "--data", "data-free", "--conditions", str(wrong))
    _refused(capsys, out, "conditions file not found", "--teacher", pipeline, "--data", "data-free",
             "--conditions", str(tmp_path / "missing.safetensors"))
    _refused(capsys, out, "is not a model folder (no config.json)", "--teacher", pipeline, "--data", "data-free",
             "--conditions", str(text_teacher / "prompts.safetensors"), f"--set=evaluate.clip_model={tmp_path}")
    _refused(capsys, out, "the CLIP score compares samples with their prompts", "--teacher", "digits",
             f"--set=evaluate.clip_model={tmp_path}")
    images = tmp_path / "images"
    write_images(images, 4, channels=3)
    _refused(capsys, out, "000.png has no 000.txt beside it", "--teacher", pipeline, "--data", str(images))
    _refused(capsys, out, "the captions condition a run on images; drop --conditions", "--teacher", pipeline,
             "--data", str(images), "--conditions", str(text_teacher / "prompts.safetensors"))
    bare = tmp_path / "bare"
    text_unet().save_pretrained(bare)
    write_captions(images)
    _refused(capsys, out, "has no tokenizer/ and text_encoder/", "--teacher", str(bare), "--scheduler",
             str(text_teacher / "pipeline" / "scheduler"), "--vae", str(text_teacher / "pipeline" / "vae"),
             "--data", str(images))
    # Teacher variants whose extra inputs pyevo does not feed, and blocks it cannot search.
    for extra, message in [({"addition_embed_type": "text"},
                            "addition_embed_type 'text' takes added_cond_kwargs"),
                           ({"num_class_embeds": 3}, "num_class_embeds 3 is class- as well as text-conditional"),
                           ({"attention_type": "gated"}, "attention_type 'gated'"),
                           ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "UNetMidBlock2DSimpleCrossAttn")]:
        folder = tmp_path / "variant"
        text_unet(**extra).save_pretrained(folder / "unet")
        DDPMScheduler(num_train_timesteps=100).save_pretrained(folder / "scheduler")
        _refused(capsys, out, message, "--teacher", str(folder), "--data", "data-free", "--conditions",
                 str(text_teacher / "prompts.safetensors"))


def test_load_student_returns_the_saved_kind(tmp_path):
    import pyevo

    pyevo.StudentUNet2DModel.from_config(small_unet(3).config).save_pretrained(tmp_path / "pixel")
    pyevo.StudentUNet2DConditionModel.from_config(text_unet().config).save_pretrained(tmp_path / "text")
    assert type(pyevo.load_student(tmp_path / "pixel")) is pyevo.StudentUNet2DModel
    assert type(pyevo.load_student(tmp_path / "text")) is pyevo.StudentUNet2DConditionModel
    text_unet().save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="holds a UNet2DConditionModel, not a pyevo student"):
        pyevo.load_student(tmp_path / "teacher")


def test_sample_cli_samples_a_text_conditional_teacher_at_its_conditions(text_teacher, tmp_path):
    from PIL import Image

    from pyevo.sample import main as sample_main

    grid = tmp_path / "grid.png"
    pipeline = str(text_teacher / "pipeline")
    for conditions in ("prompts.safetensors", "prompts.txt"):  # states, or prompts for the pipeline's text encoder
        sample_main(["--teacher", pipeline, "--conditions", str(text_teacher / conditions), "--n", "2",
                     "--steps", "2", "--guidance_scale", "2", "--out", str(grid)])
        assert Image.open(grid).mode == "RGB"  # decoded by the pipeline's VAE
    with pytest.raises(SystemExit, match="pass --conditions FILE"):
        sample_main(["--teacher", pipeline, "--n", "2", "--steps", "2", "--out", str(grid)])


def test_held_out_calls_carry_the_states_and_plain_blocks_score_alike_through_the_population_ops():
    """The held-out calls replay the prompts' states into the cross-attention blocks (the teacher-shaped
    super-block reproduces the teacher's output from them); the text-free blocks of a conditional UNet go
    through the population ops on CUDA, which agree with the per-candidate NSRs (checked here on the CPU)."""
    import random

    from pyevo.diffusion import ImageSet
    from pyevo.distill import block_nsr, heldout_calls
    from pyevo.search.population import population_nsr
    from pyevo.supernet import build_supernet

    teacher = text_unet()
    generator = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randn(6, 4, 8, 8, generator=generator), None,
                    torch.randn(6, SEQUENCE, TEXT_DIM, generator=generator))
    calls = heldout_calls(teacher, data, DDPMScheduler(num_train_timesteps=100), size=6, seed=0)
    assert torch.equal(calls["down_blocks.0"].kwargs["encoder_hidden_states"], data.encoder_hidden_states)
    supernet = build_supernet(teacher)
    for name in ("down_blocks.0", "mid_block", "up_blocks.1"):
        supernet[name].set_genome(supernet[name].space.teacher_genome())
        assert block_nsr(supernet[name], calls[name]) < 1e-10, name
    rng = random.Random(0)
    for name in ("down_blocks.1", "up_blocks.0"):  # DownBlock2D, UpBlock2D: no transformer
        block = supernet[name]
        genomes = [block.space.random_genome(rng) for _ in range(3)]
        expected = []
        for genome in genomes:
            block.set_genome(genome)
            expected.append(block_nsr(block, calls[name]))
        assert population_nsr(block, calls[name], genomes) == pytest.approx(expected, rel=1e-4, abs=1e-7), name


def write_tiny_clip(folder, max_length: int = 6, suffix: str = "", projection: bool = False, layers: int = 1,
                    seed: int = 4) -> None:
    """A tiny CLIP tokenizer (a handful of BPE tokens) and text encoder of width TEXT_DIM, as a pipeline's
    tokenizer/ and text_encoder/ (random weights, built here: no download). ``suffix`` "_2" and
    ``projection``: an SDXL pipeline's second ones, tokenizer_2/ and text_encoder_2/, a
    CLIPTextModelWithProjection (its pooled output projected to TEXT_DIM)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "a", "lo", "l</w>", "w</w>", "r</w>", "t</w>", "s</w>",
             "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                  pad_token="<|endoftext|>").save_pretrained(folder / f"tokenizer{suffix}")
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection if projection else CLIPTextModel
    model(CLIPTextConfig(vocab_size=len(vocab), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=max_length, projection_dim=TEXT_DIM,
                         bos_token_id=23, eos_token_id=24, pad_token_id=24)).save_pretrained(folder / f"text_encoder{suffix}")


def write_tiny_clip_model(folder, image_size: int = 16) -> None:
    """A tiny CLIPModel (text and vision towers, random weights) and its CLIPProcessor in ``folder``:
    what ``evaluate.clip_model`` names (a download of openai/clip-vit-large-patch14, at real scale)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    write_tiny_clip(folder / "parts", max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "parts" / "tokenizer")
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(5)
    config = CLIPConfig(text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=tokenizer.model_max_length, bos_token_id=23,
                                         eos_token_id=24, pad_token_id=24),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           image_size=image_size, patch_size=4), projection_dim=8)
    CLIPModel(config).save_pretrained(folder)


def test_clip_score_is_100_times_the_cosine_of_clips_embeddings(tmp_path):
    from pyevo.metrics import ClipUnavailable, clip_score, load_clip_model

    write_tiny_clip_model(tmp_path / "clip")
    clip = load_clip_model(str(tmp_path / "clip"))
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    texts = ["lower", "low", "newer", "wider", "lowest", "w"]
    # Directly: the processor's pixels of the RGB uint8 images, the projected embeddings, their cosines.
    model, processor = clip
    pixels = images.add(1).mul(127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    with torch.no_grad():
        image = model.get_image_features(processor(images=list(pixels), return_tensors="pt")["pixel_values"])
        tokens = processor(text=texts, return_tensors="pt", padding=True)
        text = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
    image, text = (torch.nn.functional.normalize(getattr(e, "pooler_output", e).double(), dim=-1) for e in (image, text))
    cosines = (image * text).sum(dim=-1)
    mean = 100 * float(cosines.mean())
    assert abs(mean) > 1e-3
    assert clip_score(images, texts, clip, batch_size=4) == pytest.approx(max(mean, 0.0), rel=1e-4, abs=1e-4)
    # Text embeddings negated (the projection's sign flipped): the mean cosine flips, and torchmetrics'
    # floor at 0 leaves exactly one of the two scores positive.
    with torch.no_grad():
        model.text_projection.weight.neg_()
    try:
        assert clip_score(images, texts, clip) == pytest.approx(max(-mean, 0.0), rel=1e-4, abs=1e-4)
    finally:
        with torch.no_grad():
            model.text_projection.weight.neg_()
    with pytest.raises(ClipUnavailable, match="not found"):
        load_clip_model(str(tmp_path / "missing"))
    with pytest.raises(ClipUnavailable, match="is not a loadable CLIP model folder"):
        load_clip_model(str(tmp_path / "clip" / "parts"))


def test_prompts_are_encoded_by_the_teacher_pipelines_text_encoder_as_stable_diffusion_encodes_them(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    pipeline = tmp_path / "pipeline"
    write_tiny_clip(pipeline)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("lower newer\n\nwider lowest\nlow\n")  # the blank line is left out
    unet = text_unet()
    conditions = load_conditions(str(prompts), unet, pipeline)
    assert conditions.states.shape == (3, 6, TEXT_DIM) and conditions.unconditional == "the empty prompt"
    # The texts stay with their states (the CLIP score reads them), cycling as the rows do.
    assert conditions.prompt_rows(4) == ["lower newer", "wider lowest", "low", "lower newer"]
    pipe = StableDiffusionPipeline(vae=tiny_kl(), text_encoder=CLIPTextModel.from_pretrained(pipeline / "text_encoder"),
                                   tokenizer=CLIPTokenizer.from_pretrained(pipeline / "tokenizer"), unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    states, negative = pipe.encode_prompt(["lower newer", "wider lowest", "low"], "cpu", 1, True)  # negative: ""
    torch.testing.assert_close(conditions.states, states)
    torch.testing.assert_close(conditions.negative, negative[:1])  # the empty prompt's states
    with pytest.raises(ConditionsError, match="has no tokenizer/ and text_encoder/"):
        load_conditions(str(prompts), unet, tmp_path / "bare")
    prompts.write_text("\n \n")
    with pytest.raises(ConditionsError, match="holds no prompt"):
        load_conditions(str(prompts), unet, pipeline)


def test_caption_folder_trains_each_image_at_its_captions_states(text_teacher, tmp_path):
    """Images with captions beside them (name.png + name.txt): the captions are encoded by the teacher
    pipeline's text encoder, cached with the latents, and condition training and evaluation."""
    from pyevo.conditions import encode_prompts

    images = tmp_path / "images"
    write_images(images, 12, channels=3)
    write_captions(images)
    out = tmp_path / "run"
    write_tiny_clip_model(tmp_path / "clip")
    result = cli("--teacher", str(text_teacher / "pipeline"), "--data", str(images), "--guidance-scale", "2",
                 "--out", str(out), "--metric-features", "none", f"--set=latency.cache={tmp_path / 'lat.json'}",
                 f"--set=evaluate.clip_model={tmp_path / 'clip'}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["text_conditional"] and report["student"]["psnr_vs_teacher"] is not None
    # The captions are the prompts the samples were drawn at: both models get a CLIP score against them.
    assert all(isinstance(report[name]["clip_score"], float) for name in ("teacher", "student"))
    assert report["clip"]["model"] == str(tmp_path / "clip") and "CLIP score (" in (out / "report.md").read_text()
    cached = safetensors.torch.load_file(out / "latents.safetensors")
    captions = [path.read_text().strip() for path in sorted(images.glob("*.txt"))]
    expected = encode_prompts(captions, text_teacher / "pipeline").states
    every = torch.cat([cached["train.encoder_hidden_states"], cached["heldout.encoder_hidden_states"]])
    assert len(every) == 12 and every.shape[1:] == expected.shape[1:]
    # Each cached row is one caption's states (the split reorders the images).
    assert torch.cdist(every.flatten(1), expected.flatten(1)).min(dim=1).values.max() < 1e-5
