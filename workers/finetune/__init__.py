"""Fine-tune: QLoRA / LoRA / full fine-tuning of a chat model on the user's own data (job kind `finetune`).

Modules: `data` reads the user's files (JSONL, JSON, CSV, Parquet; Alpaca, ShareGPT/OpenAI messages,
prompt/completion, plain text), renders each example through the tokenizer's own chat template and masks the prompt
(answer-only loss), and writes the data report; `estimate` sizes a run from the model's config alone (presets keep
theirs in assets/presets/finetune.json); `train` is the job kind (transformers' Trainer through trl's SFTTrainer, with
callbacks for progress, metrics and cancel, checkpoints, resume and the out-of-memory path).

Run folder of a `finetune` job (runs/<job id>/):

    run.json                      run card: base (preset/folder, repo, revision), data and dev hashes, every param,
                                  seed, method, package versions, the memory path used (fused loss, optimizer, dtype)
    events.jsonl                  progress, metric (train_loss, dev_loss, perplexity, lr, tokens_per_s, peak_bytes,
                                  eta_s), log, data_report, preview, oom events
    data_report.json              the data report (workers.finetune.data.report)
    adapter/                      the result, PEFT's format (lora, qlora):
        adapter_model.safetensors
        adapter_config.json       base_model_name_or_path = the base's repo or folder
        tokenizer files + chat_template.jinja (the template the model was trained with)
    model/                        the result of method=full: a transformers folder (safetensors) + tokenizer
    checkpoint/
        state.json                {"step", "epoch", "dir": "checkpoint-<step>", "sha256": {file: hash}, "micro_batch",
                                   "grad_accum", "data_hash", ...}: the studio's record; Resume reads only a
                                   checkpoint whose files match these hashes and that lies in the studio's runs folder
        checkpoint-<step>/        transformers' Trainer checkpoint (adapter safetensors, optimizer, scheduler, RNG,
                                  trainer_state.json); only the newest is kept
    distributed/                  a run over several processes (devices=0,1 / all / N; workers.finetune.distributed):
                                  how the worker and the ranks talk (spec.json, accelerate.json, progress.jsonl,
                                  cancel, result.json, rank<k>.log): see that module's docstring

Another job uses the result through `adapter_dir(run_dir)` (workers.finetune.train): the Chat kind's `adapter=` and
`finetune_merge` take a finetune job id or an adapter folder.
"""
