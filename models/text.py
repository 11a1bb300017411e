"""Text front end: tokenizers and upstream's sentence splitting.

A real model folder carries the Qwen (CosyVoice) or Llama (Orpheus) tokenizer and is read with the
`tokenizers` library. Presets have no tokenizer files, so they use `ByteTokenizer`: UTF-8 bytes plus a
few named special tokens, enough to drive a model whose weights are random anyway.
"""

from __future__ import annotations

import json
import os
import re

from models.errors import UserError

# The special tokens upstream adds to the Qwen tokenizer, in upstream's order (ids are appended after
# the tokenizer's own vocabulary, so `<|endofprompt|>` lands on 151646 for CosyVoice-BlankEN).
COSYVOICE2_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|endofprompt|>",
    "[breath]", "<strong>", "</strong>", "[noise]", "[laughter]", "[cough]", "[clucking]", "[accent]",
    "[quick_breath]", "<laughter>", "</laughter>", "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]",
]
_CV3_PHONES = (
    "AA AA0 AA1 AA2 AE AE0 AE1 AE2 AH AH0 AH1 AH2 AO AO0 AO1 AO2 AW AW0 AW1 AW2 AY AY0 AY1 AY2 B CH D DH "
    "EH EH0 EH1 EH2 ER ER0 ER1 ER2 EY EY0 EY1 EY2 F G HH IH IH0 IH1 IH2 IY IY0 IY1 IY2 JH K L M N NG OW OW0 "
    "OW1 OW2 OY OY0 OY1 OY2 P R S SH T TH UH UH0 UH1 UH2 UW UW0 UW1 UW2 V W Y Z ZH "
    "a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié iòng "
    "ióng iù iú iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s sh t u "
    "uang ue un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī uō uǎ uǎi "
    "uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào á ái án áng áo è èi èn èng èr é éi én éng ér ì ìn ìng í "
    "ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn īng ō ōng ōu ū ūn "
    "ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ"
)
COSYVOICE3_SPECIAL = COSYVOICE2_SPECIAL + ["<|endofsystem|>"] + [f"[{p}]" for p in _CV3_PHONES.split()]

# Qwen2's pre-tokenisation pattern (used when a folder has vocab.json + merges.txt but no tokenizer.json)
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


class HFTokenizer:
    """A Hugging Face tokenizer folder read with `tokenizers`, plus extra special tokens."""

    def __init__(self, folder: str, extra_special: list[str] = (), add_bos: bool = False):
        from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        path = os.path.join(folder, "tokenizer.json")
        if os.path.isfile(path):
            tok = Tokenizer.from_file(path)
        elif os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
            tok = Tokenizer(BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
            tok.decoder = decoders.ByteLevel()
            cfg = os.path.join(folder, "tokenizer_config.json")
            if os.path.isfile(cfg):
                with open(cfg) as f:
                    added = json.load(f).get("added_tokens_decoder", {})
                for _, info in sorted(added.items(), key=lambda kv: int(kv[0])):
                    tok.add_special_tokens([info["content"]])
        else:
            raise UserError(f"tokenizer folder {folder} has neither tokenizer.json nor vocab.json + merges.txt.",
                            "copy the tokenizer files of the model into that folder")
        if extra_special:
            tok.add_special_tokens(list(extra_special))
        self._tok = tok
        self.add_bos = add_bos
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=self.add_bos).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the named special tokens. For presets without tokenizer files."""

    def __init__(self, special: list[str] = (), bos: str | None = None):
        self.special = {s: 256 + i for i, s in enumerate(special)}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in special) + ")") if special else None
        self.bos = bos
        self.vocab_size = 256 + len(self.special)

    def encode(self, text: str) -> list[int]:
        ids = [self.special[self.bos]] if self.bos else []
        parts = self._split.split(text) if self._split else [text]
        for p in parts:
            if p in self.special:
                ids.append(self.special[p])
            elif p:
                ids.extend(p.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        inv = {v: k for k, v in self.special.items()}
        out, buf = [], bytearray()
        for i in ids:
            if i in inv:
                out.append(buf.decode("utf-8", "replace"))
                buf = bytearray()
                out.append(inv[i])
            else:
                buf.append(i)
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)

    def token_id(self, token: str) -> int | None:
        return self.special.get(token)


# -- sentence splitting (upstream `split_paragraph` rules, re-implemented) ------------------------------

_CJK = re.compile(r"[\u4e00-\u9fff]")
_ZH_STOPS = "。？！；：、.?!;"
_EN_STOPS = ".?!;:"
_ONLY_PUNCT = re.compile(r"^[\W_]*$", re.UNICODE)


def contains_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


def normalize_text(text: str) -> str:
    """The normalisation upstream applies when no text-normalisation engine is installed."""
    text = text.strip()
    if contains_chinese(text):
        text = text.replace("\n", "")
        text = re.sub(r"(?<=[^\x00-\x7f]) | (?=[^\x00-\x7f])", "", text)  # blanks next to CJK go
        text = text.replace(".", "。").replace(" - ", "，")
        for a, b in (("（", ""), ("）", ""), ("【", ""), ("】", ""), ("`", ""), ("——", " ")):
            text = text.replace(a, b)
        text = re.sub(r"[，,、]+$", "。", text)
    return text


def split_sentences(text: str, count_tokens, max_tokens: int = 80, min_tokens: int = 60, merge_len: int = 20,
                    hard_max: int = 160) -> list[str]:
    """Split long text into utterances like upstream: cut at sentence punctuation, then greedily join
    pieces until adding one would pass `max_tokens` while the current one already has `min_tokens`;
    a short tail (< merge_len) joins the previous utterance. Chinese counts characters, other text
    counts tokens. Pieces that are only punctuation are dropped. Unlike upstream, a piece longer than
    `hard_max` (a run-on sentence, text without punctuation) is cut at its last comma or space
    before the limit, so no utterance outgrows the LLM's prompt."""
    text = text.strip()
    if not text:
        return []
    zh = contains_chinese(text)
    stops = _ZH_STOPS if zh else _EN_STOPS
    length = len if zh else (lambda s: len(count_tokens(s)))
    if text[-1] not in stops:
        text += "。" if zh else "."
    pieces, start, i = [], 0, 0
    while i < len(text):
        if text[i] in stops:
            end = i + 1
            if end < len(text) and text[end] in "\"”":
                end += 1  # keep a closing quote with its sentence
            if text[start:i]:
                pieces.append(text[start:end])
            start, i = end, end
            continue
        i += 1
    pieces = [q for p in pieces for q in _cut_long(p, length, hard_max)]
    utts, cur = [], ""
    for p in pieces:
        # upstream's rule, and never a join past hard_max (short pieces joined to a long one could)
        if cur and ((length(cur + p) > max_tokens and length(cur) > min_tokens) or length(cur + p) > hard_max):
            utts.append(cur)
            cur = ""
        cur += p
    if cur:
        if utts and length(cur) < merge_len and length(utts[-1] + cur) <= hard_max:
            utts[-1] += cur
        else:
            utts.append(cur)
    return [u for u in utts if not _ONLY_PUNCT.match(u)]


def _cut_long(piece: str, length, hard_max: int) -> list[str]:
    """`piece` in parts of at most `hard_max` (by `length`), cut after a comma if one is in the
    second half of a part, else after a space, else (one endless word) anywhere."""
    out = []
    while length(piece) > hard_max:
        lo, hi = 1, len(piece)  # the longest prefix that fits, by bisection on characters
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if length(piece[:mid]) <= hard_max:
                lo = mid
            else:
                hi = mid - 1
        head = piece[:lo]
        cut = max(head.rfind(","), head.rfind("，"), head.rfind("、"))
        if cut < lo // 2:
            cut = head.rfind(" ")
        cut = cut + 1 if cut > 0 else lo
        out.append(piece[:cut])
        piece = piece[cut:]
    return out + [piece] if piece else out
