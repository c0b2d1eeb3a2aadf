"""Parallel pairs (English source, target-language translation): Django's catalogs, TSV, JSONL.

Every reader yields ``Pair`` records; ``split_pairs`` then holds out evaluation pairs by a hash of
the English side, so the same English sentences are held out in every language and no held-out
sentence is ever trained on, whatever the order of the files or the set of languages.

File formats (plain or ``.gz``):

- TSV (``.tsv``, ``.txt``): one pair a line, ``src<TAB>tgt`` or ``src<TAB>tgt<TAB>alignment``;
  blank lines are skipped.
- JSONL (``.jsonl``, ``.json``): one object a line, ``{"src": "...", "tgt": "..."}``, optionally
  ``"lang": "de"`` to override the file's language and ``"alignment": "0-0 1-2"``.

An alignment is the pair's word alignment in Pharaoh format, as fast_align and awesome-align write
it: space-separated links ``i-j``, source word ``i`` aligned to target word ``j``, words being the
whitespace-separated tokens of each side, counted from 0. An empty alignment (a TSV line ending in
a tab, ``"alignment": ""``) is a pair with no aligned words; a pair without one is aligned by the
trainer's mutual-argmax aligner. Repeated links count once.

A file's language is given as ``LANG=PATH``, or else is its name up to the first dot
(``de.tsv.gz`` -> ``de``).
"""

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import re
import string
import zlib

# printf-style (%s, %(name)s, %d, %%) and str.format-style ({0}, {name}) placeholders: a pair that
# has them teaches the model to align format codes, not words.
PLACEHOLDER = re.compile(r"%(\([^)]*\))?[-#0 +]*\d*(\.\d+)?[sdifrxXeEgGcu%]|\{[^{}]*\}")


class DataError(ValueError):
    """Bad input data: the message names the file (and line) or the language."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """One parallel pair; ``alignment``: sorted (source word, target word) links, or None when the
    data gave none (module doc)."""

    src: str
    tgt: str
    lang: str
    alignment: tuple[tuple[int, int], ...] | None = None


# --------------------------------------------------------------------------------------------------
# Django's .po catalogs
# --------------------------------------------------------------------------------------------------


def django_catalogs() -> dict[str, list[str]]:
    """Language code -> the django.po files of that language in the installed ``django`` package
    (django/conf/locale and every contrib app's locale directory)."""
    import django

    root = os.path.dirname(django.__file__)
    patterns = ("conf/locale/*/LC_MESSAGES/django.po", "contrib/*/locale/*/LC_MESSAGES/django.po")
    catalogs: dict[str, list[str]] = {}
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(root, pattern))):
            lang = path.split(os.sep)[-3]
            catalogs.setdefault(lang, []).append(path)
    catalogs.pop("en", None)  # English to English: not a translation
    return catalogs


def _usable(msgid: str, msgstr: str) -> bool:
    return bool(msgid.strip() and msgstr.strip()) and msgid != msgstr and not (
        PLACEHOLDER.search(msgid) or PLACEHOLDER.search(msgstr)
    )


def read_po(path: str, lang: str) -> list[Pair]:
    """Pairs of (msgid, msgstr) from one catalog: untranslated, fuzzy, obsolete and plural entries,
    entries with placeholders and entries left in English are dropped."""
    import polib

    pairs = []
    for entry in polib.pofile(path):
        if entry.obsolete or entry.fuzzy or entry.msgid_plural or not _usable(entry.msgid, entry.msgstr):
            continue
        pairs.append(Pair(" ".join(entry.msgid.split()), " ".join(entry.msgstr.split()), lang))
    return pairs


def read_django(languages: list[str]) -> list[Pair]:
    """Pairs of the given Django languages; DataError for a language Django does not ship."""
    catalogs = django_catalogs()
    unknown = [lang for lang in languages if lang not in catalogs]
    if unknown:
        raise DataError(
            f"unknown language(s) {', '.join(unknown)} for --data django; available: {', '.join(sorted(catalogs))}"
        )
    return [pair for lang in languages for path in catalogs[lang] for pair in read_po(path, lang)]


# --------------------------------------------------------------------------------------------------
# TSV and JSONL files
# --------------------------------------------------------------------------------------------------


def parse_source(spec: str) -> tuple[str, str]:
    """``LANG=PATH`` or ``PATH`` -> (lang, path); the language defaults to the name before its first dot.
    An ``=`` after a path separator belongs to the path (``data/lang=de/train.tsv``)."""
    lang, sep, path = spec.partition("=")
    if not sep or "/" in lang or os.sep in lang:
        path, lang = spec, os.path.basename(spec).split(".")[0]
    if not lang:
        raise DataError(f"{spec}: cannot tell the language of this file; write it as LANG=PATH")
    return lang, path


def _open_lines(path: str):
    """The file's lines as bytes (gz too): each is decoded alone, so that a line that is not UTF-8
    is reported (or skipped) by its number like any other malformed line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, number: int) -> str:
    """One line as text; a UTF-8 byte-order mark at the start of the file is dropped."""
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 text (byte 0x{raw[error.start]:02x} at byte {error.start} of the line)") from None


LINK = re.compile(r"([0-9]+)-([0-9]+)")


def parse_alignment(text: str, source_words: int, target_words: int) -> tuple[tuple[int, int], ...]:
    """Pharaoh links ``"0-0 1-2"`` -> ((0, 0), (1, 2)), sorted, repeats dropped.

    ValueError for a link that is not ``i-j`` or whose index is not a word of its side
    (``source_words``, ``target_words``: the whitespace-separated words of each side).
    """
    links = set()
    for link in text.split():
        match = LINK.fullmatch(link)
        if match is None:
            raise ValueError(f"alignment: {link!r} is not a link i-j (Pharaoh format, e.g. '0-0 1-2')")
        i, j = int(match[1]), int(match[2])
        if i >= source_words:
            raise ValueError(f"alignment: link {link!r}: source word {i} is out of range "
                             f"(the source has {source_words} words)")
        if j >= target_words:
            raise ValueError(f"alignment: link {link!r}: target word {j} is out of range "
                             f"(the target has {target_words} words)")
        links.add((i, j))
    return tuple(sorted(links))


def _parse_tsv(line: str) -> tuple[str, str, str | None]:
    fields = line.split("\t")
    if len(fields) not in (2, 3):
        raise ValueError(f"expected 'src<TAB>tgt' or 'src<TAB>tgt<TAB>alignment' (2 or 3 fields), "
                         f"got {len(fields)} field(s)")
    return fields[0], fields[1], fields[2] if len(fields) == 3 else None


def _parse_jsonl(line: str) -> tuple[str, str, str | None, str | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f'expected a JSON object {{"src": ..., "tgt": ...}}, got {type(record).__name__}')
    for key in ("src", "tgt"):
        if not isinstance(record.get(key), str):
            raise ValueError(f'expected a string at key "{key}", got {record.get(key)!r}')
    for key in ("lang", "alignment"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise ValueError(f'expected a string at key "{key}", got {record[key]!r}')
    return record["src"], record["tgt"], record.get("alignment"), record.get("lang")


def read_file(path: str, lang: str, skip_bad_lines: bool = False) -> tuple[list[Pair], int]:
    """Pairs of one TSV or JSONL file (gz too) and the number of bad lines skipped.

    A malformed line (wrong field count, bad JSON, missing key, an empty side, an alignment that is
    not Pharaoh links or points past a side's words) raises DataError naming file and line, unless
    ``skip_bad_lines``, which counts it instead.
    """
    name = path[:-3] if path.endswith(".gz") else path
    is_json = name.endswith((".jsonl", ".json"))
    pairs, bad = [], 0
    with _open_lines(path) as lines:
        try:
            for number, raw in enumerate(lines, start=1):
                try:
                    line = _decode(raw, number).rstrip("\r\n")
                    if not line.strip():
                        continue
                    if is_json:
                        src, tgt, alignment, line_lang = _parse_jsonl(line)
                    else:
                        (src, tgt, alignment), line_lang = _parse_tsv(line), None
                    src, tgt = " ".join(src.split()), " ".join(tgt.split())
                    if not src or not tgt:
                        raise ValueError("empty source or target")
                    if alignment is not None:
                        alignment = parse_alignment(alignment, src.count(" ") + 1, tgt.count(" ") + 1)
                except ValueError as error:
                    if not skip_bad_lines:
                        raise DataError(f"{path}:{number}: {error} (use --skip-bad-lines to skip such lines)") from None
                    bad += 1
                    continue
                pairs.append(Pair(src, tgt, line_lang or lang, alignment))
        except (OSError, EOFError, zlib.error) as error:  # zlib.error: a corrupt .gz stream
            raise DataError(f"{path}: cannot read ({error})") from None
    return pairs, bad


# --------------------------------------------------------------------------------------------------
# Held-out split
# --------------------------------------------------------------------------------------------------


def holdout_key(text: str) -> str:
    """A sentence as the split compares it: case-folded, without punctuation or spaces at its ends.
    The teacher's tokenizer is uncased, so "User" and "user" are one input to it, and "Delete?"
    and "Delete" nearly one: the split must not train on one and evaluate on the other."""
    return text.casefold().strip(string.punctuation + string.whitespace)


def holdout_score(src: str) -> float:
    """A fixed pseudo-random number in [0, 1) for an English sentence (the SHA-1 of its key)."""
    return int.from_bytes(hashlib.sha1(holdout_key(src).encode("utf-8")).digest()[:8], "big") / 2**64


def split_pairs(pairs: list[Pair], eval_fraction: float, eval_size: int) -> tuple[list[Pair], dict[str, list[Pair]]]:
    """(training pairs, held-out pairs per language).

    A pair is held out when its English side scores below ``eval_fraction``; per language the
    ``eval_size`` lowest-scoring such pairs with distinct sources and targets are kept (retrieval
    needs one right answer). Training pairs are deduplicated and share neither an English side
    with a held-out pair of any language nor a target with a held-out pair of their language.
    Sentences are compared as ``holdout_key`` gives them (case and end punctuation aside).
    """
    train, held = [], {}
    seen = set()
    for pair in pairs:
        if (pair.src, pair.tgt, pair.lang) in seen:
            continue
        seen.add((pair.src, pair.tgt, pair.lang))
        if holdout_score(pair.src) < eval_fraction:
            held.setdefault(pair.lang, []).append(pair)
        else:
            train.append(pair)
    held_targets = {(pair.lang, holdout_key(pair.tgt)) for candidates in held.values() for pair in candidates}
    train = [pair for pair in train if (pair.lang, holdout_key(pair.tgt)) not in held_targets]
    evaluation = {}
    for lang, candidates in held.items():
        chosen, srcs, tgts = [], set(), set()
        for pair in sorted(candidates, key=lambda p: (holdout_score(p.src), p.tgt)):
            # Distinct as the teacher sees them: "User" and "user" embed alike, and retrieval
            # between them is a coin toss whatever the model.
            src, tgt = holdout_key(pair.src), holdout_key(pair.tgt)
            if src not in srcs and tgt not in tgts and len(chosen) < eval_size:
                chosen.append(pair)
                srcs.add(src)
                tgts.add(tgt)
        evaluation[lang] = chosen
    return train, evaluation


# --------------------------------------------------------------------------------------------------
# The corpus of a run
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
    """Training pairs of the trained languages and held-out pairs of every evaluated language."""

    train: list[Pair]
    evaluation: dict[str, list[Pair]]
    skipped_lines: int = 0


def load_corpus(
    data: list[str],
    languages: list[str] | None,
    eval_languages: list[str],
    *,
    skip_bad_lines: bool = False,
    eval_fraction: float = 0.2,
    eval_size: int = 200,
) -> Corpus:
    """Read ``data`` (``["django"]`` or file specs), keep the training pairs of ``languages`` (when None,
    the files' languages but ``eval_languages``) and the held-out pairs of those and of ``eval_languages``.

    DataError, before any model loads, for an unknown language, a missing file, a malformed line,
    no training pair left, or an evaluated language without held-out pairs.
    """
    if data == ["django"]:
        if not languages:
            raise DataError("--data django needs --languages (for example de,fr)")
        pairs, skipped = read_django(list(dict.fromkeys(languages + eval_languages))), 0
    else:
        if "django" in data:
            raise DataError("--data takes either 'django' or data files, not both")
        pairs, skipped = [], 0
        for spec in data:
            lang, path = parse_source(spec)
            file_pairs, bad = read_file(path, lang, skip_bad_lines)
            if not file_pairs:
                raise DataError(f"{path}: no pairs in this file")
            pairs += file_pairs
            skipped += bad
        present = sorted({pair.lang for pair in pairs})
        unknown = [lang for lang in (languages or []) + eval_languages if lang not in present]
        if unknown:
            raise DataError(f"unknown language(s) {', '.join(unknown)}: the data files hold {', '.join(present)}")
        if not languages:  # every language of the files but those held out for evaluation only
            languages = [lang for lang in present if lang not in eval_languages]
            if not languages:
                raise DataError(f"--eval-languages names every language of the data files ({', '.join(present)}): "
                                "give the ones to train on with --languages")
    train, held = split_pairs(pairs, eval_fraction, eval_size)
    train = [pair for pair in train if pair.lang in languages]
    if not train:
        raise DataError(f"empty corpus: no training pairs for language(s) {', '.join(languages)}")
    evaluated = list(dict.fromkeys(languages + eval_languages))
    missing = [lang for lang in evaluated if not held.get(lang)]
    if missing and eval_size > 0:
        raise DataError(
            f"no held-out pairs for language(s) {', '.join(missing)} (raise --eval-fraction or add data)"
        )
    return Corpus(train, {lang: held.get(lang, []) for lang in evaluated} if eval_size > 0 else {}, skipped)
