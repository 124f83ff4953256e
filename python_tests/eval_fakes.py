"""Stand-ins for the model side of the evaluation harness: a word tokenizer and fake answers."""
import re
import zlib
from pathlib import Path
from types import SimpleNamespace

# The converted default model's folder, when this machine has it (tests on the real tokenizer).
SMOLLM_DIR = Path.home() / ".cache" / "citrus_ext" / "SmolLM2-135M-Instruct"


class WordTokenizer:
    """Each word with its leading whitespace is one token; ids are stable hashes of the text."""

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[zlib.crc32(w.encode()) for w in re.findall(r"\s*\S+", text)])


class FakeAnswer:
    """An answer function that records its calls. ``citrus_*`` methods find a passkey by reading
    the document; every other method answers something unrelated."""

    def __init__(self):
        self.calls = []

    def __call__(self, document, instruction, *, method, budget, chunk_size, max_new_tokens, needle_spans,
                 **options):
        self.calls.append((method, budget, chunk_size))
        self.max_new_tokens = max_new_tokens
        self.needle_spans = needle_spans
        found = re.search(r"pass key is (\d+)", document)
        citrus = method.startswith("citrus")
        text = f"The pass key is {found.group(1)}." if citrus and found else "Here we go."
        states = len(document.split()) if method == "full" else budget + chunk_size
        return SimpleNamespace(text=text, token_ids=[], stats={
            "peak_states_per_layer": [states, states],
            "needle_kept_read": [1.0, 0.5] if citrus else [0.0, 0.0]})
