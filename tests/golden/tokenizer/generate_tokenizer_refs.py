"""Reference data for the tokenizer tests, from the Python `tokenizers` package.

1. `byte_tokenizer.json`: a byte-level BPE with no merges (256 tokens, one per byte), matching the
   256-token vocabulary of the golden models, so text prompts work end to end on them.
2. `deepseek_v3_ids.json`: ids the real DeepSeek-V3 tokenizer gives a varied text (mixed scripts,
   digits, emoji, whitespace runs), for the test that loads the real tokenizer.json.
3. `deepseek_v3_chat.json`: DeepSeek-V3's chat template rendered as transformers renders it.
4. `deepseek_v3_prompt_ids.json`: the same texts with `add_special_tokens=True` (the tokenizer's
   post-processor), and `add_bos_token` / the BOS id from `tokenizer_config.json`: a prompt's ids
   are those, with BOS first when `add_bos_token` is set and the post-processor did not add it
   (what transformers' LlamaTokenizerFast, DeepSeek-V3's declared class, does).

Rerun: python tests/golden/tokenizer/generate_tokenizer_refs.py [DIR_WITH_DEEPSEEK_V3_TOKENIZER_JSON]
(default: $HOME/.cache/deepseek-burn/tokenizer-deepseek-v3, filled by scripts/fetch_deepseek_v3_tokenizer.sh).
Pinned: tokenizers as installed with tests/golden/requirements.txt.
"""
import json
import os
import sys

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))

TEXTS = [
    "Hello, world! DeepSeek-V3 has 671B parameters (37B active).",
    "数学: 3.14159 × 2 = 6.28318; 東京タワー 한국어 Ελληνικά русский العربية",
    "emoji 🚀🔥👩‍💻 and   multiple    spaces\n\n\ttabs\r\n",
    "def f(x):\n    return x**2  # comment\n1234567890 007 3e-5",
    "<｜begin▁of▁sentence｜>User: hi<｜end▁of▁sentence｜>",
]


def byte_tokenizer():
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    assert len(vocab) == 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(HERE, "byte_tokenizer.json"))
    refs = [{"text": t, "ids": tok.encode(t).ids} for t in TEXTS]
    for r in refs:
        assert tok.decode(r["ids"]) == r["text"], r
    with open(os.path.join(HERE, "byte_tokenizer_ids.json"), "w") as f:
        json.dump({"tokenizers": tokenizers.__version__, "cases": refs}, f, ensure_ascii=False, indent=1)


def deepseek_v3(dir_):
    path = os.path.join(dir_, "tokenizer.json")
    if not os.path.exists(path):
        print(f"skipping DeepSeek-V3 ids: {path} not found")
        return
    tok = Tokenizer.from_file(path)
    refs = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in TEXTS]
    with open(os.path.join(HERE, "deepseek_v3_ids.json"), "w") as f:
        json.dump({"tokenizers": tokenizers.__version__, "vocab_size": tok.get_vocab_size(True), "cases": refs}, f, ensure_ascii=False, indent=1)
    config = json.load(open(os.path.join(dir_, "tokenizer_config.json")))
    bos = config["bos_token"]["content"] if isinstance(config["bos_token"], dict) else config["bos_token"]
    special = [{"text": t, "ids": tok.encode(t, add_special_tokens=True).ids} for t in TEXTS]
    with open(os.path.join(HERE, "deepseek_v3_prompt_ids.json"), "w") as f:
        json.dump({
            "tokenizers": tokenizers.__version__,
            "add_bos_token": bool(config.get("add_bos_token", False)),
            "bos_token_id": tok.token_to_id(bos),
            "cases": special,
        }, f, ensure_ascii=False, indent=1)



def chat_reference(dir_):
    """The DeepSeek-V3 chat template rendered as transformers renders it (jinja2 sandbox with
    trim_blocks and lstrip_blocks, loop controls), for the minijinja port's test."""
    path = os.path.join(dir_, "tokenizer_config.json")
    if not os.path.exists(path):
        print(f"skipping the chat reference: {path} not found")
        return
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    config = json.load(open(path))
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    template = env.from_string(config["chat_template"])
    bos = config["bos_token"]["content"] if isinstance(config["bos_token"], dict) else config["bos_token"]
    conversations = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a prime  number.\n"},
        ],
    ]
    cases = [{"messages": m, "add_generation_prompt": True, "rendered": template.render(messages=m, add_generation_prompt=True, bos_token=bos)} for m in conversations]
    with open(os.path.join(HERE, "deepseek_v3_chat.json"), "w") as f:
        json.dump({"jinja2": jinja2.__version__, "cases": cases}, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    source = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/deepseek-burn/tokenizer-deepseek-v3")
    byte_tokenizer()
    deepseek_v3(source)
    chat_reference(source)
