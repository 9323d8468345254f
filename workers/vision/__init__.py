"""Vision chat: ask a vision-language model about images (`vision_chat`: llama.cpp's multimodal handlers, or
transformers in 4-bit with a LoRA adapter) and teach it your own image-text pairs with QLoRA (`vision_check` writes
the data report, `vision_finetune` trains).

Modules: `model` resolves a model name (presets in assets/presets/vision.json, a GGUF + its mmproj projector, a
transformers LLaVA folder) and sizes it; `backends` loads either backend behind one stream(); `chat` is the
`vision_chat` kind; `data`, `check` and `train` are the fine-tuning side (the Fine-tune tab's trainer path).
"""
