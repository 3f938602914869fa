"""A tiny `StableDiffusionPipeline` built from configs (random weights) for fast CPU tests.

Every call with the same folder builds bit-identical weights (`torch.manual_seed(0)` before any
module is created), so two pipelines from `tiny_sd_pipeline` share their base model exactly.
The tokenizer is the miniature world's word-level CLIP tokenizer; 8x8 latents, 64x64 images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from evalsuite.miniature.captions import vocabulary
from evalsuite.miniature.tokenizer import build_tokenizer


def tiny_sd_pipeline(tmp_path: Path) -> StableDiffusionPipeline:
    """Build the tiny pipeline; its tokenizer files are written under `tmp_path / "tok"`."""
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
    text_config = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=tok.model_max_length,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
    text_encoder = CLIPTextModel(text_config).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder, tokenizer=tok, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
