import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hpcserve.engine.detok import IncrementalDetokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve façade, jalapeño, Ångström, über straße.",
    "日本語のテキストです。東京は大きい都市です。中文文本也很好。",
    "Emoji time 😀🎉🚀 with hearts ❤️ and flags 🇫🇷 and families 👨‍👩‍👧.",
    "Привет мир, Ελληνικά γράμματα, עברית, العربية.",
    "def hello(x):\n    return x * 2  # code\n\n",
    "Stop words: STOP, END, ### and ``` fences.",
    "Numbers 12345 67890 and symbols !@#$%^&*()",
] * 3

SAMPLES = [
    " Hello world! Café 😀 日本語 ok.",
    "naïve 🎉🎉 東京 façade ### STOP more",
    "👨‍👩‍👧 family and 🇫🇷 flag, Ελληνικά, עברית",
    "\n\n    return x  # 中文文本 ❤️",
    "Ångström über straße jalapeño brûlée 🚀",
]


@pytest.fixture(scope="module")
def tok():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def stream(tok, prompt, out_ids, chunks=None, **kw):
    d = IncrementalDetokenizer(tok, prompt, **kw)
    deltas = []
    i = 0
    rng = random.Random(len(out_ids))
    while i < len(out_ids):
        n = chunks or rng.randint(1, 3)
        deltas.append(d.add_tokens(out_ids[i : i + n]))
        i += n
    deltas.append(d.finish())
    return d, deltas


def test_multibyte_chars_are_split_across_tokens(tok):
    # Sanity check that the fixture exercises the U+FFFD path.
    ids = enc(tok, "😀🎉 日本語")
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("chunks", [1, 2, None])
def test_real_text_roundtrip_without_replacement_chars(tok, text, chunks):
    prompt = enc(tok, "The quick brown fox")
    ids = enc(tok, text)
    d, deltas = stream(tok, prompt, ids, chunks=chunks)
    assert tok.decode(ids) == text
    assert "".join(deltas) == text == d.text
    assert not any("\ufffd" in x for x in deltas)
    assert d.stop_hit is None


def test_random_token_sequences_concat_to_full_decode(tok):
    rng = random.Random(1234)
    v = len(tok)
    for trial in range(200):
        prompt = [rng.randrange(v) for _ in range(rng.randint(1, 8))]
        out = [rng.randrange(v) for _ in range(rng.randint(0, 40))]
        skip = trial % 2 == 0
        _, deltas = stream(tok, prompt, out, skip_special_tokens=skip)
        full = tok.decode(out, skip_special_tokens=skip)
        assert "".join(deltas) == full, (prompt, out)
        if "\ufffd" not in full:
            assert not any("\ufffd" in x for x in deltas)


def test_random_text_sequences_no_replacement_mid_stream(tok):
    rng = random.Random(99)
    words = " ".join(CORPUS + SAMPLES).split(" ")
    for _ in range(50):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
        ids = enc(tok, text)
        prompt = enc(tok, rng.choice(SAMPLES))
        _, deltas = stream(tok, prompt, ids, chunks=1)
        assert "".join(deltas) == tok.decode(ids)
        assert not any("\ufffd" in x for x in deltas)


def test_prompt_not_emitted_and_leading_space_kept(tok):
    prompt = enc(tok, "Hello")
    out = enc(tok, " world 😀")
    d, deltas = stream(tok, prompt, out, chunks=1)
    assert d.text == " world 😀"
    assert "Hello" not in "".join(deltas)


def test_special_tokens_skipped(tok):
    out = [tok.bos_token_id] + enc(tok, "Café") + [tok.eos_token_id]
    d, deltas = stream(tok, enc(tok, "x"), out, chunks=1)
    assert d.text == "".join(deltas) == "Café"
    d, deltas = stream(tok, enc(tok, "x"), out, chunks=1, skip_special_tokens=False)
    assert d.text == "".join(deltas) == "<s>Café</s>"


def test_stop_string_split_across_tokens(tok):
    text = "The quick brown STOP fox jumps"
    ids = enc(tok, text)
    # the stop string spans several tokens with this small vocab
    assert not any("STOP" in tok.decode([i]) for i in ids)
    d = IncrementalDetokenizer(tok, enc(tok, "go"), stop=["STOP"])
    deltas = [d.add_tokens([i]) for i in ids]
    assert d.stop_hit == "STOP"
    assert d.text == "".join(deltas) == "The quick brown "
    assert all("S" not in x for x in deltas)
    assert d.add_tokens(enc(tok, " more")) == ""
    assert d.finish() == ""
    assert d.text == "The quick brown "


def test_earliest_stop_wins_and_multibyte_stop(tok):
    text = "ok 日本語 then 😀🎉 end"
    ids = enc(tok, text)
    d, deltas = stream(tok, [0], ids, chunks=1, stop=["end", "😀🎉", "本"])
    assert d.stop_hit == "本"
    assert d.text == "ok 日"
    d, deltas = stream(tok, [0], ids, chunks=3, stop=["end", "🎉"])
    assert d.stop_hit == "🎉"
    assert d.text == "".join(deltas) == "ok 日本語 then 😀"


def test_stop_at_very_start(tok):
    d, deltas = stream(tok, [0], enc(tok, "###abc"), chunks=1, stop=["###"])
    assert d.stop_hit == "###" and d.text == "" and deltas == [""] * len(deltas)


def test_partial_stop_prefix_held_then_released(tok):
    d = IncrementalDetokenizer(tok, enc(tok, "x"), stop=["###", "END!"])
    shown = "".join(d.add_tokens([i]) for i in enc(tok, "abc ##"))
    assert shown == "abc "  # "##" could still become "###"
    assert d.text == "abc "
    assert d.finish() == "##"
    assert d.text == "abc ##" and d.stop_hit is None

    d = IncrementalDetokenizer(tok, enc(tok, "x"), stop=["###", "END!"])
    shown = "".join(d.add_tokens([i]) for i in enc(tok, "a ## b EN"))
    assert shown == "a ## b "  # the "##" was released once " b" proved it was not a stop
    shown += "".join(d.add_tokens([i]) for i in enc(tok, "D?"))
    assert shown == "a ## b END?"
    assert d.finish() == ""


def test_stop_with_no_hit_still_concats_to_full_decode(tok):
    for text in SAMPLES:
        ids = enc(tok, text)
        d, deltas = stream(tok, [1], ids, stop=["zzz", "q#q"])
        assert "".join(deltas) == tok.decode(ids)
        assert d.stop_hit is None


def test_decode_window_stays_small(tok):
    calls = []

    class Counting:
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return tok.decode(ids, **kw)

    text = " ".join(SAMPLES * 6)
    ids = enc(tok, text)
    d, _ = stream(Counting(), enc(tok, "The"), ids, chunks=1)
    assert d.text == text
    assert len(ids) > 200
    assert max(calls) <= 12  # windowed, never the whole output
    assert len(calls) <= 2 * len(ids) + 2
