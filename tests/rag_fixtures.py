"""Things the Chat/RAG tests build: a notes corpus (Markdown, Python, PDF), a tiny cross-encoder, an eval set."""
import json
from pathlib import Path

GARDEN = """# Garden notes

## Tomatoes
Tomatoes need six hours of direct sun every day.
Water them at the base every morning, never the leaves.
The best variety for the balcony is Sungold.

## Basil
Basil hates the cold: keep it indoors below ten degrees Celsius.
Pinch the flowers off so the leaves stay sweet.
"""

SERVER = '''import socket


def start_backup_server(port=8080):
    """Start the nightly backup server on the given port."""
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    return s


class RetryPolicy:
    """How the uploader retries a failed backup."""

    max_retries = 5
    backoff_seconds = 2.5
'''

TRAVEL = ["Travel plan for Lisbon.", "The flight leaves on the third of May at nine.",
          "The hotel is in Alfama, near the castle."]


def make_pdf(path: Path, lines: list[str]) -> Path:
    """A minimal valid one-page PDF with text (Helvetica), written by hand: no PDF library needed."""
    text = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({ln}) Tj T*" for ln in lines) + " ET"
    objs = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(text)} >>\nstream\n{text}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = "%PDF-1.4\n", []
    for i, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n" + "".join(f"{o:010d} 00000 n \n" for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    path.write_bytes(out.encode("latin-1"))
    return path


def make_notes(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "garden.md").write_text(GARDEN)
    (root / "code").mkdir(exist_ok=True)
    (root / "code" / "backup.py").write_text(SERVER)
    make_pdf(root / "travel.pdf", TRAVEL)
    return root


def make_evalset(path: Path) -> Path:
    rows = [
        {"question": "How many hours of sun do tomatoes need?", "answer": "Six hours of direct sun.",
         "source": "garden.md"},
        {"question": "What port does the backup server start on?", "answer": "Port 8080.",
         "source": "code/backup.py"},
        {"question": "When does the flight to Lisbon leave?", "answer": "On the third of May at nine.",
         "source": "travel.pdf"},
        {"question": "How many times does the uploader retry a failed backup?", "answer": "Five times.",
         "source": "code/backup.py"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def make_tiny_cross_encoder(folder: Path) -> Path:
    """A random tiny BERT cross-encoder (wiring only: no reranker ships its weights on PyPI)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w.strip(".,:;()\"'").lower() for w in (GARDEN + SERVER + " ".join(TRAVEL)).split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab))
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=512, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tiny_hf_llm(folder: Path) -> Path:
    """A random tiny Llama with a byte-level BPE tokenizer and a chat template, saved as a transformers folder."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)  # the same random model every run
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([GARDEN, SERVER, " ".join(TRAVEL)] * 20, vocab_size=400,
                            special_tokens=["<s>", "</s>", "<pad>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    tok.save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
