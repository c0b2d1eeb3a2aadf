"""Reading pairs: Django catalogs, TSV, JSONL, gz; every bad input's error; the held-out split."""

import gzip
import json

import pytest

from mmkd_train.data import (DataError, Pair, holdout_key, load_corpus, parse_alignment, parse_source, read_django,
                             read_file, split_pairs)


def test_tsv_jsonl_and_gz_read_alike(tmp_path):
    rows = [("the red house", "das rote Haus"), ("a dog", "ein Hund")]
    tsv = tmp_path / "de.tsv"
    tsv.write_text("the red house\tdas rote Haus\n\na dog\tein Hund\n", encoding="utf-8")
    jsonl = tmp_path / "de.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as handle:
        for s, t in rows:
            handle.write(json.dumps({"src": s, "tgt": t}) + "\n")
    tsv_gz = tmp_path / "de.tsv.gz"
    with gzip.open(tsv_gz, "wt", encoding="utf-8") as handle:
        handle.write(tsv.read_text(encoding="utf-8"))
    for path in (tsv, jsonl, tsv_gz):
        pairs, bad = read_file(str(path), "de")
        assert [(p.src, p.tgt, p.lang) for p in pairs] == [(s, t, "de") for s, t in rows] and bad == 0


def test_jsonl_lang_key_overrides_the_file_language(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"src": "yes", "tgt": "oui", "lang": "fr"}\n{"src": "no", "tgt": "nein"}\n')
    pairs, _ = read_file(str(path), "de")
    assert [p.lang for p in pairs] == ["fr", "de"]


@pytest.mark.parametrize("name, text, message", [
    ("a.tsv", "ok\tgut\nno tab here\n", "a.tsv:2: expected 'src<TAB>tgt' or 'src<TAB>tgt<TAB>alignment' (2 or 3 fields), got 1"),
    ("a.tsv", "one\ttwo\t0-0\tfour\n", "a.tsv:1: expected 'src<TAB>tgt' or 'src<TAB>tgt<TAB>alignment' (2 or 3 fields), got 4"),
    ("a.tsv", "one\ttwo\tthree\n", "a.tsv:1: alignment: 'three' is not a link i-j"),
    ("a.tsv", "ok\tgut\na b\tx y\t0-0 1-\n", "a.tsv:2: alignment: '1-' is not a link i-j"),
    ("a.tsv", "a b\tx y\t0-0 1-2\n", "a.tsv:1: alignment: link '1-2': target word 2 is out of range (the target has 2 words)"),
    ("a.tsv", "a b\tx y\t2-1\n", "a.tsv:1: alignment: link '2-1': source word 2 is out of range (the source has 2 words)"),
    ("a.tsv", "a b\tx y\t0-0,1-1\n", "a.tsv:1: alignment: '0-0,1-1' is not a link i-j"),
    ("a.jsonl", '{"src": "a", "tgt": "b", "alignment": [[0, 0]]}\n', 'a.jsonl:1: expected a string at key "alignment"'),
    ("a.jsonl", '{"src": "a", "tgt": "b", "alignment": "0-1"}\n', "a.jsonl:1: alignment: link '0-1': target word 1 is out of range"),
    ("a.tsv", "ok\tgut\n \t x\n", "a.tsv:2: empty source or target"),
    ("a.jsonl", '{"src": "a", "tgt": "b"}\n{not json\n', "a.jsonl:2: invalid JSON"),
    ("a.jsonl", '["a", "b"]\n', "a.jsonl:1: expected a JSON object"),
    ("a.jsonl", '{"src": "a"}\n', 'a.jsonl:1: expected a string at key "tgt"'),
    ("a.jsonl", '{"src": "a", "tgt": 3}\n', 'a.jsonl:1: expected a string at key "tgt", got 3'),
])
def test_a_malformed_line_names_file_and_line_or_is_skipped_and_counted(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match="--skip-bad-lines") as error:
        read_file(str(path), "de")
    assert message in str(error.value)
    pairs, bad = read_file(str(path), "de", skip_bad_lines=True)
    assert bad == 1 and len(pairs) == text.count("\n") - 1


def test_alignments_in_tsv_jsonl_and_gz(tmp_path):
    """A third TSV column or an "alignment" key gives the pair its links; without one a pair has None,
    with an empty one it has no links. Indices count whitespace words after normalization."""
    tsv = tmp_path / "de.tsv.gz"
    with gzip.open(tsv, "wt", encoding="utf-8") as handle:
        handle.write("the  red house\tdas rote Haus\t0-0 1-1 2-2 1-1\n"
                     "a dog\tein Hund\n"
                     "yes\tja\t\n")
    jsonl = tmp_path / "de.jsonl"
    jsonl.write_text('{"src": "the red house", "tgt": "das Haus", "alignment": "2-1 0-0"}\n'
                     '{"src": "a dog", "tgt": "ein Hund", "alignment": null}\n', encoding="utf-8")
    pairs, bad = read_file(str(tsv), "de")
    assert bad == 0 and [p.alignment for p in pairs] == [((0, 0), (1, 1), (2, 2)), None, ()]
    assert pairs[0].src == "the red house"
    pairs, _ = read_file(str(jsonl), "de")
    assert [p.alignment for p in pairs] == [((0, 0), (2, 1)), None]


def test_parse_alignment_reads_pharaoh_links():
    assert parse_alignment("0-0 1-2  3-1\t", 4, 3) == ((0, 0), (1, 2), (3, 1))
    assert parse_alignment("", 1, 1) == ()
    for text, message in [("0-3", "target word 3 is out of range"), ("4-0", "source word 4 is out of range"),
                          ("0p1", "not a link"), ("-1-0", "not a link"), ("0-0-0.9", "not a link")]:
        with pytest.raises(ValueError, match=message):
            parse_alignment(text, 4, 3)


def test_missing_unreadable_and_undecodable_files(tmp_path):
    with pytest.raises(DataError, match="nope.tsv: no such data file"):
        read_file(str(tmp_path / "nope.tsv"), "de")
    not_gzip = tmp_path / "a.tsv.gz"
    not_gzip.write_text("a\tb\n")
    with pytest.raises(DataError, match="a.tsv.gz: cannot read"):
        read_file(str(not_gzip), "de")
    bad = tmp_path / "bin.tsv"
    bad.write_bytes(b"ok\tgut\n\xff\xfe\x00a\tb\nyes\tja\n")
    with pytest.raises(DataError, match=r"bin.tsv:2: not UTF-8 text \(byte 0xff at byte 0 of the line\)"):
        read_file(str(bad), "de")
    pairs, skipped = read_file(str(bad), "de", skip_bad_lines=True)
    assert [p.src for p in pairs] == ["ok", "yes"] and skipped == 1


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    for name, text in (("de.tsv", "the cat\tdie Katze\n"), ("de.jsonl", '{"src": "the cat", "tgt": "die Katze"}\n')):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        pairs, _ = read_file(str(path), "de")
        assert [(p.src, p.tgt) for p in pairs] == [("the cat", "die Katze")], name


def test_lang_equals_path_and_an_equals_sign_inside_a_path():
    assert parse_source("de=data/train.tsv") == ("de", "data/train.tsv")
    assert parse_source("data/lang=de/fr.train.tsv") == ("fr", "data/lang=de/fr.train.tsv")
    assert parse_source("pt-BR.tsv") == ("pt-BR", "pt-BR.tsv")


def test_django_pairs_drop_placeholders_plurals_and_untranslated():
    pairs = read_django(["de"])
    assert len(pairs) > 300
    assert all(p.lang == "de" and p.src != p.tgt for p in pairs)
    assert not any("%" in p.src or "{" in p.src or "%" in p.tgt for p in pairs)
    assert ("Yes", "Ja") in {(p.src, p.tgt) for p in pairs}


def test_unknown_language_empty_corpus_and_missing_heldout(tmp_path):
    with pytest.raises(DataError, match="unknown language.*klingon.*available: .*de"):
        load_corpus(["django"], ["klingon"], [])
    path = tmp_path / "xx.tsv"
    path.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match="unknown language.*de: the data files hold xx"):
        load_corpus([str(path)], ["de"], [])
    with pytest.raises(DataError, match="empty corpus"):
        load_corpus([str(path)], None, [], eval_fraction=1.0, eval_size=0)
    with pytest.raises(DataError, match="no held-out pairs for language.*xx"):
        load_corpus([str(path)], None, [], eval_fraction=0.0)
    empty = tmp_path / "yy.tsv"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="yy.tsv: no pairs"):
        load_corpus([str(empty)], None, [])


def test_split_is_deterministic_and_holds_out_english_sentences_in_every_language():
    pairs = [Pair(f"sentence {i}", f"satz {i}", lang) for i in range(200) for lang in ("de", "fr")]
    train, held = split_pairs(pairs, 0.2, 15)
    again, held_again = split_pairs(list(reversed(pairs)), 0.2, 15)
    assert sorted(map(str, train)) == sorted(map(str, again)) and held == {k: held_again[k] for k in held}
    assert len(held["de"]) == len(held["fr"]) == 15
    assert {p.src for p in held["de"]} == {p.src for p in held["fr"]}
    assert not {p.src for p in train} & {p.src for v in held.values() for p in v}


def test_no_near_copy_of_a_held_out_pair_is_trained_on():
    """The teacher is uncased: "User" and "user" are one input to it. A sentence held out in one
    form is not trained on in another (case, end punctuation), nor is a held-out target of the
    same language trained on under another English side."""
    pairs = [Pair(f"sentence {i}", f"satz {i}", "de") for i in range(200)]
    _, held = split_pairs(pairs, 0.2, 100)
    src, tgt = held["de"][0].src, held["de"][0].tgt
    near = [Pair(src.upper(), "anders", "de"), Pair(f" {src}?", "noch anders", "de"),
            Pair("another sentence entirely", tgt.capitalize() + ".", "de"),
            Pair("yet another sentence", tgt, "fr")]
    train, held_again = split_pairs(pairs + near, 0.2, 100)
    keys = {holdout_key(p.src) for p in train}
    assert holdout_key(src) not in keys and "another sentence entirely" not in keys
    assert "yet another sentence" in keys  # another language's target: no overlap there
    assert {holdout_key(p.src) for p in held_again["de"]} >= {holdout_key(src)}
    # the evaluation set holds one of each: two that embed alike make retrieval a coin toss
    for pairs_of_lang in held_again.values():
        assert len({holdout_key(p.src) for p in pairs_of_lang}) == len(pairs_of_lang)
        assert len({holdout_key(p.tgt) for p in pairs_of_lang}) == len(pairs_of_lang)


def test_files_train_on_their_languages_but_those_held_out_for_evaluation(tmp_path):
    """--eval-languages are "not trained on": with files and no --languages, the others are trained."""
    files = []
    for lang in ("de", "it"):
        path = tmp_path / f"{lang}.tsv"
        path.write_text("".join(f"sentence {i}\t{lang} {i}\n" for i in range(40)), encoding="utf-8")
        files.append(f"{lang}={path}")
    corpus = load_corpus(files, None, ["it"], eval_fraction=0.25, eval_size=5)
    assert {p.lang for p in corpus.train} == {"de"}
    assert sorted(corpus.evaluation) == ["de", "it"] and all(len(v) == 5 for v in corpus.evaluation.values())
    assert {p.lang for p in load_corpus(files, None, [], eval_fraction=0.25, eval_size=5).train} == {"de", "it"}
    with pytest.raises(DataError, match="--eval-languages names every language of the data files \\(de, it\\): give "
                                        "the ones to train on with --languages"):
        load_corpus(files, None, ["de", "it"])


def test_a_corrupt_gz_file_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "de.tsv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(f"sentence number {i}\tSatz Nummer {i}\n" for i in range(2000)))
    data = bytearray(path.read_bytes())
    for at in range(40, len(data) - 20, 7):  # past the header, before the trailer
        data[at] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"de.tsv.gz: cannot read"):
        read_file(str(path), "de")
