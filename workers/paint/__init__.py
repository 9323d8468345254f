"""Paint: Stable Diffusion 1.5 / SDXL generation (`paint`) and style-LoRA training (`paint_lora`) with diffusers."""
