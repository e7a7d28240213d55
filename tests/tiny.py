"""A tiny causal LM and tokenizer, built offline in a second, shaped like a real chat model folder."""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Answer: yes. Answer: no. Please answer in one word.",
    "What is the capital of France? Paris is the capital of France.",
    "user assistant system tool call name arguments json",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } \" ' : ; , . ! ?",
    "Human: hello Assistant: hi there, how can I help you today?",
]


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model_dir(path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_workspace(root: Path, pairs: int) -> Path:
    """A tiny model at root/model and `pairs` answer-format pairs at root/data/train.jsonl (the fault tests' run)."""
    import json

    from core.data.synthetic import answer_format_pairs

    build_tiny_model_dir(root / "model")
    (root / "data").mkdir()
    with open(root / "data" / "train.jsonl", "w") as f:
        for row in answer_format_pairs(pairs, seed=1):
            f.write(json.dumps(row) + "\n")
    return root


def result_in_fresh_python(module: str, function: str, arg: str, timeout: int) -> dict:
    """`module.function(arg)` run in a new Python process (a DeepSpeed engine's process-group state stays out of the
    test process), its JSON result back; the child's output shown if it printed none."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = f"import json; from {module} import {function}; print('RESULT', json.dumps({function}({arg!r})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=timeout)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])
