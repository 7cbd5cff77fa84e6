"""Writes configs/shapes-tokenizer.json: a BERT WordPiece tokenizer (lower-casing, BERT
pre-tokenisation, [CLS] ... [SEP]) with a small vocabulary for the synthetic shapes task, so the
default experiment needs no download. Words outside the vocabulary split into characters
(`##x` pieces), never [UNK]. Run from the repository root: python3 configs/make_shapes_tokenizer.py
"""

import json
import string

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "black", "circle", "square",
         "triangle", "star", "cross", "left", "right", "of", "a", "an", "the", "and", "small", "large",
         "big", "shape", "object", "on", "in", "top", "bottom", "above", "below", "next", "to"]
PUNCT = list(".,;:!?'\"()-/")
CHARS = list(string.ascii_lowercase + string.digits)

vocab = {}
for tok in SPECIAL + WORDS + PUNCT + CHARS + ["##" + c for c in CHARS]:
    vocab.setdefault(tok, len(vocab))

added = [{"id": vocab[t], "special": True, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False} for t in SPECIAL]
tok = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": added,
    "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                   "strip_accents": None, "lowercase": True},
    "pre_tokenizer": {"type": "BertPreTokenizer"},
    "post_processor": {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
        "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [vocab["[CLS]"]], "tokens": ["[CLS]"]},
                           "[SEP]": {"id": "[SEP]", "ids": [vocab["[SEP]"]], "tokens": ["[SEP]"]}},
    },
    "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
    "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
              "max_input_chars_per_word": 100, "vocab": vocab},
}
with open("configs/shapes-tokenizer.json", "w") as f:
    json.dump(tok, f, indent=1)
print(len(vocab), "tokens")
