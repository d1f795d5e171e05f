"""Builds the small CLIP-style tokenizer bundled with prm for `random:ARCH` models.

    tools/.venv/bin/python tools/golden/make_tokenizer.py   # writes assets/tokenizer/tiny-clip-tokenizer.json

Structure as in Hugging Face's CLIP `tokenizer.json`: NFC, whitespace collapse, lower-casing,
CLIP's split regex, byte-level pre-tokenisation, BPE with the `</w>` end-of-word suffix; the
special tokens `<|startoftext|>` and `<|endoftext|>` are added *after* the BPE vocabulary so that
`<|endoftext|>` is the largest id, as in CLIP (the text tower pools at the argmax id). The BPE is
trained on the prompt templates and a list of common class names (at most 1,024 entries;
the corpus yields 612). Deterministic.
"""
import pathlib

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "assets" / "tokenizer" / "tiny-clip-tokenizer.json"

CLASSES = """background aeroplane bicycle bird boat bottle bus car cat chair cow dining table dog horse
motorbike person potted plant sheep sofa train tv monitor wall building sky floor tree ceiling road
bed window grass cabinet sidewalk earth door mountain water house sea rug field fence rock
rocket astronaut coffee cup galaxy star moon sun space ship flower leaf food plate""".split()


def main():
    templates = (ROOT / "assets" / "prompt_templates.txt").read_text().splitlines()
    corpus = [t.replace("{}", c) for t in templates for c in CLASSES]
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=None))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT))
    print(OUT, "vocab", tok.get_vocab_size(with_added_tokens=True),
          "eot", tok.token_to_id("<|endoftext|>"), "sot", tok.token_to_id("<|startoftext|>"))
    print(tok.encode("a photo of a rocket.").tokens)


if __name__ == "__main__":
    main()
