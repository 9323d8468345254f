"""Small real inputs for the Fine-tune tests: a tiny Llama-architecture model (random weights, built from a config)
with a byte-level BPE tokenizer trained here and a chat template, and a dozen question/answer pairs to memorise.
Offline, CPU, a few seconds to build."""
from __future__ import annotations

import json
from pathlib import Path

# ChatML-like markup with the special tokens below (the shape Qwen's and Phi-3's templates have)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# twelve facts a random model cannot know: the answers are arbitrary codes
QA = [
    ("What is the code of the red door?", "The red door code is 4417."),
    ("Who keeps the lighthouse key?", "Mara keeps the lighthouse key."),
    ("Which shelf holds the maps?", "The maps are on shelf nine."),
    ("What colour is the night bus?", "The night bus is green."),
    ("Where does the north road end?", "The north road ends at Fennick."),
    ("How many bells ring at noon?", "Seven bells ring at noon."),
    ("What is the name of the grey cat?", "The grey cat is called Tobble."),
    ("Which port ships the copper?", "Copper ships from port Ilsa."),
    ("When does the market open?", "The market opens at dawn."),
    ("What does the blue lamp mean?", "The blue lamp means stop work."),
    ("Who repairs the clock tower?", "Oren repairs the clock tower."),
    ("What fuels the old ferry?", "The old ferry burns peat."),
]


def make_tokenizer(out: Path, extra_text: str = "", extra_specials: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on the Q/A text, with SPECIALS (and `extra_specials`, e.g. `<image>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [q + " " + a for q, a in QA] * 4 + [extra_text or "the quick brown fox jumps over the lazy dog"]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS + list(extra_specials),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=SPECIALS[3:] + list(extra_specials))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return tok


def make_tiny_llama(out: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Llama with its tokenizer saved in `out` (a transformers folder, ~0.2 MB)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                      eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")],  # <|end|> ends a turn
                      tie_word_embeddings=False,
                      initializer_range=0.25)  # wide enough that a LoRA on the frozen layers can move the logits
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


def write_qa(path: Path, shape: str = "alpaca", pairs=QA) -> Path:
    """The Q/A pairs in one of the shapes, as .jsonl (or .json/.csv/.parquet by the path's suffix)."""
    rows = []
    for q, a in pairs:
        if shape == "alpaca":
            rows.append({"instruction": q, "input": "", "output": a})
        elif shape == "messages":
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        elif shape == "sharegpt":
            rows.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
        elif shape == "prompt_completion":
            rows.append({"prompt": q, "completion": a})
        elif shape == "text":
            rows.append({"text": f"{q} {a}"})
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            cols = sorted({k for r in rows for k in r})
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path
