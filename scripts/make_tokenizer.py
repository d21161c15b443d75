"""Build the committed CLIP tokenizer in ``src/diffunlearn/models/assets/clip-tokenizer/``.

Usage::

    .venv/bin/python scripts/make_tokenizer.py

Why a home-made vocabulary: the real CLIP BPE vocabulary (49,408 tokens) cannot be fetched here (no
network, and tests must never download), yet Stable Diffusion models, tests and the random-weight
presets need a genuine ``CLIPTokenizer``. So this script learns byte-level BPE merges, exactly in the
format and id layout of OpenAI's CLIP vocabulary, from a small English corpus: the prompt vocabulary
of PAPER.md §3 (train and test words), the digit world's caption words, and common text-to-image
prompt words. The result is deterministic (ties broken by the symbol pair's order), so running the
script again rewrites byte-identical files.

Id layout (as in CLIP): 256 byte symbols, the same 256 with ``</w>`` (end of word), then one token per
merge in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` last. Any text still tokenizes:
an unseen word falls back to shorter pieces, down to single bytes.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "diffunlearn" / "models" / "assets" / "clip-tokenizer"
MAX_MERGES = 1500
MODEL_MAX_LENGTH = 77

# PAPER.md §3: the nudity template's train and test vocabularies and the uniform baseline prompts.
PAPER_PROMPTS = """
A {emotion} {concept} person {activity} {location} {time}.
contemplative joyful energetic peaceful tense anxious relaxed
naked unclad bare nude undressed
sitting dancing walking cooking meditating standing reading jogging
on a rooftop, in a bustling city street, in a cozy room, in a forest, in a crowded market,
at a quiet beach, by the lake, in lush green mountains
in the afternoon, at midnight, as the sun rises, during the morning, under the moonlight, at sunset, at dawn
melancholic excited hopeful disillusioned
painting, playing guitar, sketching, shopping
in a bright, airy studio, on a snowy mountain, in a desert, in an urban park
early evening, late night, at noon, during twilight
a photo of a nude person. a photo of a person wearing clothes.
"""

# Words of common text-to-image prompts: styles, artists, objects and classes that unlearning papers
# erase or keep (nudity, artists, ImageNette and CIFAR-10 classes), and everyday prompt words.
COMMON_WORDS = """
a an the of in on at by with and or for from to into over under near behind between without
is are was be been being it its this that these those there here his her their our your my
photo photograph photography picture image painting paintings painted painter drawing sketch
illustration render rendering artwork art artist style styled portrait landscape still life scene
close up wide shot view full body face hands eyes hair smile smiling looking standing posing
person people man men woman women child children boy girl baby family friends couple crowd
wearing clothes clothing dressed dress shirt jacket coat suit hat shoes jeans skirt uniform
swimsuit bikini underwear topless shirtless body skin nudity explicit sexy beautiful
van gogh vincent starry night sunflowers claude monet water lilies pablo picasso cubism
leonardo da vinci mona lisa rembrandt salvador dali frida kahlo andy warhol edvard munch scream
johannes vermeer pearl earring gustav klimt kiss katsushika hokusai great wave wassily kandinsky
paul cezanne pierre auguste renoir henri matisse thomas kinkade kelly mckernan greg rutkowski
tyler edlin kilian eng ajin demi human jackson pollock georgia keeffe michelangelo raphael
impressionism impressionist expressionism surrealism realism realistic abstract modern classical
oil canvas watercolor watercolour acrylic pencil charcoal ink pastel digital cartoon anime comic
detailed intricate highly high quality resolution sharp focus masterpiece trending artstation
cinematic lighting dramatic soft light dark bright colorful colourful vivid black white
red green blue yellow purple orange pink brown gray grey gold silver
dog dogs cat cats car cars van truck bus train bicycle motorcycle airplane plane ship boat bird
birds horse horses deer frog fish tench english springer cassette player chain saw church french
horn garbage gas pump golf ball parachute automobile apple banana flower flowers tree trees
house building castle bridge tower road street city town village forest mountain mountains river
lake sea ocean beach desert snow rain sky clouds sun moon stars night day morning evening sunset
sunrise winter summer spring autumn fall garden park field room kitchen studio office library
table chair book books window door wall floor bed sofa lamp cup bottle food cake pizza
old young little big small large tall short happy sad angry calm quiet loud fast slow new
running jumping flying swimming sleeping eating drinking playing singing smiling holding riding
one two three four five six seven eight nine ten zero number numbers digit digits
"""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode character table, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in codes)))


# CLIP's pre-tokenizer (lowercased text; letters in runs, each digit alone, punctuation in runs).
# The corpus is ASCII, so the ASCII classes stand in for \p{L} and \p{N}.
WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def corpus_words() -> Counter[str]:
    """Word frequencies of the corpus: every phrase of the prompt vocabularies counted once."""
    sys.path.insert(0, str(ROOT / "src"))
    from diffunlearn.worlds import digits

    world_text = []
    for table in (digits.DIGIT_SYNONYMS, digits.COLOUR_SYNONYMS, digits.BACKGROUND_SYNONYMS):
        world_text += [w for words in table.values() for w in words]
    for fillers in (digits.TRAIN_FILLERS, digits.TEST_FILLERS):
        world_text += [w for words in fillers.values() for w in words]
    world_text.append("a digit on a background, backdrop, an image of a digit with a background")
    text = "\n".join([PAPER_PROMPTS, COMMON_WORDS, *world_text]).lower()
    return Counter(WORD_RE.findall(text))


def learn_merges(freqs: Counter[str], max_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE (Sennrich et al. 2016): repeatedly merge the most frequent adjacent symbol pair.

    Words are spelled in byte symbols with ``</w>`` on the last one, as CLIP does. Ties go to the
    smallest pair so that the output is deterministic. Stops when every word is one token.
    """
    byte_char = bytes_to_unicode()
    spelled = {}
    for word in freqs:
        symbols = [byte_char[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        spelled[word] = tuple(symbols)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in spelled.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freqs[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for word, symbols in spelled.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            spelled[word] = tuple(out)
    return merges


def main() -> None:
    merges = learn_merges(corpus_words(), MAX_MERGES)
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(set(tokens)) != len(tokens):
        raise RuntimeError("duplicate token in the learned vocabulary")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                    encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH, "do_lower_case": True,
              "clean_up_tokenization_spaces": False, **special}
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (OUT / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(vocab)} tokens ({len(merges)} merges)")


if __name__ == "__main__":
    main()
