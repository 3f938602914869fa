"""Tiny diffusers pipelines of every family the runner drives, built from configs (random weights), for
fast CPU tests.

Every builder seeds torch (`torch.manual_seed(0)`) before it creates a module, so two calls build
bit-identical weights. Nothing is downloaded: CLIP tokenizers are the miniature world's word-level
tokenizer (`evalsuite.miniature.tokenizer.build_tokenizer`), and the T5 tokenizer is a
`tokenizers` Unigram model over the same words, built in code (`tiny_t5_tokenizer`).

| family | pipeline (diffusers) | denoiser | text encoders | latent -> image |
|---|---|---|---|---|
| `sd1` | StableDiffusionPipeline | UNet, epsilon | CLIP | 4x8x8 -> 8x8 |
| `sd2` | StableDiffusionPipeline | UNet, v-prediction | CLIP | 4x8x8 -> 32x32 |
| `sdxl` | StableDiffusionXLPipeline | UNet, `text_time` conditions | CLIP, CLIP + projection | 4x8x8 -> 32x32 |
| `sd3` | StableDiffusion3Pipeline | SD3Transformer2DModel (MMDiT) | 2 CLIP + projection, T5 | 4x8x8 -> 32x32 |
| `flux` | FluxPipeline | FluxTransformer2DModel | CLIP, T5 | 4x128x128 (packed 2x2) -> 128x128 |
| `pixart` | PixArtSigmaPipeline | PixArtTransformer2DModel | T5 | 4x8x8 -> 32x32 |

Flux's latent size is fixed by the pipeline (`default_sample_size` 128), hence its larger tensors; its
VAE does not downsample, so the images stay 128 pixels wide. `sd1` is `tiny_sd_pipeline`, whose 8x8
images the LoRA tests have always used. `save_tiny_pipeline(family, folder)` writes a pipeline folder
(`save_pretrained(..., safe_serialization=True)`) that `--model` takes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from evalsuite.miniature.captions import vocabulary
from evalsuite.miniature.tokenizer import build_tokenizer

# the Stable Diffusion 1.x/2.x noise schedule (its scheduler configs: scaled linear betas 0.00085-0.012)
_SD_SCHEDULE: dict[str, Any] = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000)


def tiny_sd_pipeline(tmp_path: Path) -> StableDiffusionPipeline:
    """SD 1.x: the tiny pipeline (epsilon prediction, DDIM, 8x8 latents and images); its tokenizer files are
    written under `tmp_path / "tok"`."""
    tok = build_tokenizer(vocabulary(), Path(tmp_path) / "tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=4, sample_size=8)
    text_encoder = CLIPTextModel(_clip_config(tok, 16)).eval()
    scheduler = DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder, tokenizer=tok, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_sd2_pipeline(tmp_path: Path) -> StableDiffusionPipeline:
    """SD 2.x: a StableDiffusionPipeline whose UNet predicts v (the scheduler's prediction_type
    "v_prediction", as stabilityai/stable-diffusion-2's 768 model), with SD 2's linear attention projections
    and per-block head widths; Euler sampling, 8x8 latents, 32x32 images."""
    tok = build_tokenizer(vocabulary(), Path(tmp_path) / "tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=(2, 4),
        use_linear_projection=True, norm_num_groups=4)
    text_encoder = CLIPTextModel(_clip_config(tok, 16)).eval()
    scheduler = EulerDiscreteScheduler(**_SD_SCHEDULE, prediction_type="v_prediction", steps_offset=1)
    return StableDiffusionPipeline(vae=_vae(4, blocks=3), text_encoder=text_encoder, tokenizer=tok,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def tiny_sdxl_pipeline(tmp_path: Path) -> StableDiffusionXLPipeline:
    """SDXL: two CLIP text encoders (the second with a projection, whose pooled output joins the six
    size/crop numbers in the UNet's `text_time` added embedding), Euler sampling; 32x32 images."""
    tok = build_tokenizer(vocabulary(), Path(tmp_path) / "tok")
    torch.manual_seed(0)
    hidden, hidden_2, projection, time_dim = 16, 16, 16, 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=hidden + hidden_2,  # the two encoders' penultimate states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        # 6 size numbers (original size, crop corner, target size), each embedded in time_dim, + the pooled text
        projection_class_embeddings_input_dim=6 * time_dim + projection, norm_num_groups=4)
    text_encoder = CLIPTextModel(_clip_config(tok, hidden)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tok, hidden_2, projection_dim=projection)).eval()
    scheduler = EulerDiscreteScheduler(**_SD_SCHEDULE, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=_vae(4, blocks=3), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tok, tokenizer_2=tok, unet=unet.eval(), scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)


def tiny_sd3_pipeline(tmp_path: Path) -> StableDiffusion3Pipeline:
    """SD3: an MMDiT (SD3Transformer2DModel) over two CLIP-with-projection encoders (pooled: their
    projections concatenated) and a T5 (the context: CLIP states padded to T5's width, then T5's states);
    flow-matching Euler sampling; 32x32 images."""
    tok = build_tokenizer(vocabulary(), Path(tmp_path) / "tok")
    t5_tok = tiny_t5_tokenizer()
    torch.manual_seed(0)
    clip_hidden, projection, t5_width = 16, 16, 32
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16,  # = the transformer's width (heads x head dim)
        joint_attention_dim=t5_width, pooled_projection_dim=2 * projection, pos_embed_max_size=8)
    clip_config = _clip_config(tok, clip_hidden, projection_dim=projection)
    text_encoder = CLIPTextModelWithProjection(clip_config).eval()
    text_encoder_2 = CLIPTextModelWithProjection(clip_config).eval()
    text_encoder_3 = T5EncoderModel(_t5_config(t5_tok, t5_width)).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, blocks=3, flow=True), text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2,
        tokenizer_2=tok, text_encoder_3=text_encoder_3, tokenizer_3=t5_tok)


def tiny_flux_pipeline(tmp_path: Path, guidance_embeds: bool = True) -> FluxPipeline:
    """Flux: FluxTransformer2DModel (double- and single-stream blocks) over a CLIP (pooled) and a T5
    (context); its input is the latent packed in 2x2 patches (16 = 4 latent channels x 4); with
    `guidance_embeds` (FLUX.1 [dev]) the guidance scale is an input of the transformer (distilled guidance),
    without (FLUX.1 [schnell]) it is ignored. Flow-matching Euler sampling with resolution-dependent shift."""
    tok = build_tokenizer(vocabulary(), Path(tmp_path) / "tok")
    t5_tok = tiny_t5_tokenizer()
    torch.manual_seed(0)
    clip_hidden, t5_width = 16, 32
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=1,  # one head: attention over 4,608 tokens (4,096 latent + 512 text) dominates
        joint_attention_dim=t5_width, pooled_projection_dim=clip_hidden,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))  # rotary axes sum to the head width
    text_encoder = CLIPTextModel(_clip_config(tok, clip_hidden)).eval()
    text_encoder_2 = T5EncoderModel(_t5_config(t5_tok, t5_width)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer.eval(), scheduler=scheduler, vae=_vae(4, blocks=1, flow=True),
                        text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=t5_tok)


def tiny_pixart_pipeline(tmp_path: Path) -> PixArtSigmaPipeline:
    """PixArt-Σ: a DiT with adaLN-single (PixArtTransformer2DModel) cross-attending to a T5; it predicts
    noise and a variance (out_channels = 2 x latent channels), sampled with DPM-Solver++; 32x32 images."""
    t5_tok = tiny_t5_tokenizer()
    torch.manual_seed(0)
    t5_width = 32
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=t5_width, in_channels=4, out_channels=8, cross_attention_dim=16, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)
    text_encoder = T5EncoderModel(_t5_config(t5_tok, t5_width)).eval()
    return PixArtSigmaPipeline(tokenizer=t5_tok, text_encoder=text_encoder, vae=_vae(4, blocks=3),
                               transformer=transformer.eval(), scheduler=DPMSolverMultistepScheduler())


def tiny_img2img_pipeline(tmp_path: Path) -> StableDiffusionImg2ImgPipeline:
    """An image-to-image pipeline (the runner cannot drive it): the SD 1.x components under another class."""
    return StableDiffusionImg2ImgPipeline(**tiny_sd_pipeline(tmp_path).components)


BUILDERS: dict[str, Callable[[Path], Any]] = {
    "sd1": tiny_sd_pipeline, "sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline, "pixart": tiny_pixart_pipeline, "img2img": tiny_img2img_pipeline,
}


def save_tiny_pipeline(family: str, folder: Path) -> Path:
    """Build the tiny pipeline of `family` (a key of `BUILDERS`) and save it as a diffusers folder
    (safetensors) at `folder / "pipeline"`; return that folder."""
    folder = Path(folder)
    out = folder / "pipeline"
    BUILDERS[family](folder).save_pretrained(out, safe_serialization=True)
    return out


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer (a `tokenizers` Unigram model, as T5's SentencePiece vocabulary is) whose pieces are
    the miniature world's words, each one piece: ids 0-2 are T5's <pad>, </s> and <unk>, with no sentinel
    (<extra_id_n>) tokens; a sequence ends with </s>."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = [("\u2581" + word, -1.0) for word in vocabulary()]  # "▁": SentencePiece's word-start mark
    return T5Tokenizer(vocab=specials + pieces, extra_ids=0, model_max_length=512)


def _clip_config(tok: CLIPTokenizer, hidden: int, projection_dim: int | None = None) -> CLIPTextConfig:
    """A one-layer CLIP text config over the miniature tokenizer (`projection_dim` for the models with a
    projection)."""
    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          **extra)


def _t5_config(tok: T5Tokenizer, width: int) -> T5Config:
    """A one-layer T5 encoder config of model width `width`."""
    return T5Config(vocab_size=len(tok), d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=4,
                    relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    decoder_start_token_id=tok.pad_token_id)


def _vae(latent_channels: int, blocks: int, flow: bool = False) -> AutoencoderKL:
    """A VAE with `blocks` resolution levels (the image is 2^(blocks - 1) times the latent). `flow`: the
    SD3/Flux latent normalisation (scaling and shift factors of their VAEs, no quant convs)."""
    extra: dict[str, Any] = dict(scaling_factor=1.5035, shift_factor=0.0609, use_quant_conv=False,
                                 use_post_quant_conv=False) if flow else {}
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        block_out_channels=(8,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, layers_per_block=1, norm_num_groups=4,
                        sample_size=32, mid_block_add_attention=False, **extra)  # no attention over every pixel
    return vae.eval()
