"""Named text domains for calibration and evaluation, all offline, each with its source and licence.

Pruning that only holds on its calibration source misleads, so every curve, search and prune report measures
several domains: *in-domain* sets are the held-out part of each calibration source, *out-of-domain* sets come from
sources the calibration never saw. Every set here ships with an installed package (read as files, never
imported) or with the operating system:

========== =============================================================== ====================================
name       text                                                            source and licence
========== =============================================================== ====================================
news       Lee background corpus: 300 ABC news articles                    gensim wheel ``test_data`` (LGPL-2.1)
forum      20 Newsgroups posts (alt.atheism, sci.space), headers removed   gensim wheel ``test_data`` (public
                                                                           Usenet posts, as redistributed)
docs       Python language reference topics (``pydoc_data.topics``)        CPython standard library (PSF-2.0)
reviews    movie-review sentences (Pang & Lee 2005) and 10 IMDB reviews     gensim wheel ``test_data``
           (Maas et al. 2011), labels removed                              (research data sets, as shipped)
legal      the free-software licences in ``/usr/share/common-licenses``    Debian ``base-files`` (verbatim
                                                                           copying permitted)
========== =============================================================== ====================================

Each source is cut into a calibration part (its first texts) and a held-out evaluation part (the rest) by a fixed
rule, so the two never share a text. gensim's Wikipedia dumps are deliberately not used: they are kept for
independent checks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .texts import lee_articles, read_text_file

CALIBRATION, EVALUATION, ALL = "calibration", "evaluation", "all"


def _gensim_data(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("this text set needs the gensim wheel: `pip install --no-deps gensim` (it is not imported).")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name
    if not path.exists():
        raise RuntimeError(
            f"gensim is installed but {path} is missing; reinstall with `pip install --no-deps --force-reinstall gensim`."
        )
    return path


class _Bunch(dict):
    def __setstate__(self, state):
        self.update(state)


class _NewsgroupsUnpickler(pickle.Unpickler):
    """Reads the pickled scikit-learn ``Bunch`` of gensim's ``mini_newsgroup`` as a dict, without scikit-learn."""

    def find_class(self, module, name):
        if module.startswith("sklearn"):
            return _Bunch
        if module in ("copy_reg", "copyreg", "__builtin__", "builtins") and name in ("_reconstructor", "object", "dict"):
            return super().find_class({"copy_reg": "copyreg", "__builtin__": "builtins"}.get(module, module), name)
        if module in ("numpy.core.multiarray", "numpy") and name in ("_reconstruct", "ndarray", "dtype"):  # the labels array
            return super().find_class("numpy._core.multiarray" if module != "numpy" else module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in mini_newsgroup")


def _strip_headers(post: str) -> str:
    body = post.split("\n\n", 1)[1] if "\n\n" in post else post
    lines = [l for l in body.splitlines() if not l.lstrip().startswith((">", "|"))]  # drop quoted replies
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def forum_posts() -> List[str]:
    raw = zlib.decompress(_gensim_data("mini_newsgroup").read_bytes())
    bunch = _NewsgroupsUnpickler(io.BytesIO(raw), encoding="latin1").load()
    posts = [_strip_headers(p) for p in bunch["data"]]
    return [p for p in posts if len(p.split()) >= 20]


def python_docs() -> List[str]:
    import pydoc_data.topics  # 460 kB of standard-library data: loaded only when this domain is used

    topics = pydoc_data.topics.topics
    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def reviews() -> List[str]:
    sentences = [
        re.sub(r"^__label__\w+\s+", "", l).strip()
        for l in _gensim_data("pang_lee_polarity.cor").read_text(encoding="cp1252", errors="replace").splitlines()
    ]
    sentences = [s for s in sentences if s]
    grouped = [" ".join(sentences[i : i + 20]) for i in range(0, len(sentences), 20)]
    imdb = [
        re.sub(r"^_\*\d+\s+", "", l).strip()
        for l in _gensim_data("alldata-id-10.txt").read_text(encoding="utf-8", errors="replace").splitlines()
    ]
    return grouped + [t for t in imdb if t]


def licences() -> List[str]:
    folder = Path("/usr/share/common-licenses")
    if not folder.is_dir():
        raise RuntimeError(f"the legal texts need {folder} (Debian's base-files); this machine has none.")
    seen, out = set(), []
    for path in sorted(folder.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        paragraphs = [p.strip() for p in real.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()]
        out += [" ".join(paragraphs[i : i + 8]) for i in range(0, len(paragraphs), 8)]
    return out


@dataclass(frozen=True)
class Domain:
    """A named text source and how it splits into calibration and held-out evaluation texts.

    Attributes:
        name: short name used on the command line and in reports.
        description: what the texts are.
        source: where the files come from.
        licence: the licence under which they are shipped.
        load: returns every text of the source, in a fixed order.
        calibration_fraction: the first this fraction of texts calibrate; the rest are held out.
    """

    name: str
    description: str
    source: str
    licence: str
    load: Callable[[], List[str]]
    calibration_fraction: float = 2 / 3

    def split(self, part: str) -> List[str]:
        """``calibration``: the first texts; ``evaluation``: the held-out rest; ``all``: every text."""
        texts = _texts(self.name)
        cut = round(len(texts) * self.calibration_fraction)
        return list({CALIBRATION: texts[:cut], EVALUATION: texts[cut:], ALL: texts}[part])


DOMAINS: Dict[str, Domain] = {
    d.name: d
    for d in (
        # 200 / 300: the same Lee calibration/evaluation split as everywhere else (articles 0-199 / 200-299)
        Domain(
            "news",
            "ABC news articles (Lee background corpus)",
            "gensim test_data/lee_background.cor",
            "LGPL-2.1 (gensim)",
            lambda: list(lee_articles()),
            200 / 300,
        ),
        Domain(
            "forum",
            "20 Newsgroups posts, headers and quotes removed",
            "gensim test_data/mini_newsgroup",
            "public Usenet posts as redistributed with gensim",
            forum_posts,
        ),
        Domain("docs", "Python language reference topics", "CPython pydoc_data.topics", "PSF-2.0", python_docs),
        Domain(
            "reviews",
            "movie-review sentences (Pang & Lee 2005) and IMDB reviews (Maas et al. 2011)",
            "gensim test_data/pang_lee_polarity.cor, alldata-id-10.txt",
            "research data sets as shipped with gensim",
            reviews,
        ),
        Domain(
            "legal",
            "free-software licence texts",
            "/usr/share/common-licenses (Debian base-files)",
            "verbatim copying permitted",
            licences,
        ),
    )
}

DEFAULT_CALIBRATION_DOMAINS = ("news", "forum", "docs")
DEFAULT_HELD_OUT_DOMAINS = ("reviews", "legal")


@lru_cache(maxsize=None)
def _texts(name: str) -> Tuple[str, ...]:
    return tuple(DOMAINS[name].load())


def check_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown text domain {name!r}; valid domains are {', '.join(DOMAINS)}.")
    return DOMAINS[name]


@dataclass
class TextSet:
    """Named texts with their provenance: what every protocol record lists for each set it used.

    Attributes:
        name: the set's name in reports (``news``, ``forum``, or the user's ``NAME`` of ``NAME=FILE``).
        texts: the texts.
        source / licence: where they come from and under which licence.
        part: ``calibration``, ``evaluation`` or ``user``.
        in_domain: for an evaluation set, whether the calibration saw other texts of the same source.
    """

    name: str
    texts: List[str]
    source: str
    licence: str
    part: str
    in_domain: Optional[bool] = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.texts).encode()).hexdigest()[:16]

    def record(self, n_tokens: Optional[int] = None) -> dict:
        out = {
            "name": self.name,
            "source": self.source,
            "licence": self.licence,
            "part": self.part,
            "n_texts": len(self.texts),
            "sha256": self.sha256,
        }
        if self.in_domain is not None:
            out["in_domain"] = self.in_domain
        if n_tokens is not None:
            out["n_tokens"] = n_tokens
        return out


def domain_set(name: str, part: str, calibration_domains: Sequence[str] = ()) -> TextSet:
    """The calibration part, the held-out evaluation part, or all texts of a named domain."""
    d = check_domain(name)
    if part not in (CALIBRATION, EVALUATION, ALL):
        raise ValueError(f"part must be {CALIBRATION!r}, {EVALUATION!r} or {ALL!r}, got {part!r}.")
    in_domain = (name in calibration_domains) if part != CALIBRATION else None
    return TextSet(name, d.split(part), d.source, d.licence, part, in_domain)


def user_set(spec: str, part: str = "user") -> TextSet:
    """A user's text file as a set: ``NAME=FILE`` (or just ``FILE``, named after the file), one text per line."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).stem, spec
    if not name or not path:
        raise ValueError(f"expected NAME=FILE, got {spec!r}.")
    try:
        texts = read_text_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read text file {path}: {exc}.") from None
    return TextSet(name, texts, str(path), "the user's own", part)


def check_unique(sets: Sequence[TextSet]) -> List[TextSet]:
    names = [s.name for s in sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"text set names must be unique; {', '.join(dup)} given more than once.")
    return list(sets)


def default_evaluation_sets(
    calibration_domains: Sequence[str] = DEFAULT_CALIBRATION_DOMAINS, held_out_domains: Sequence[str] = DEFAULT_HELD_OUT_DOMAINS
) -> List[TextSet]:
    """The held-out part of each calibration domain (in-domain), then every text of each domain the calibration
    never saw (out-of-domain)."""
    sets = [domain_set(n, EVALUATION, calibration_domains) for n in calibration_domains]
    sets += [domain_set(n, ALL, calibration_domains) for n in held_out_domains if n not in calibration_domains]
    return check_unique(sets)


# Words per piece when calibration texts of several domains are interleaved (about 200 tokens).
MIX_PIECE_WORDS = 150


def _pieces(text: str, words: int = MIX_PIECE_WORDS) -> List[str]:
    w = text.split()
    return [" ".join(w[i : i + words]) for i in range(0, len(w), words)]


def calibration_sources(domains: Sequence[str] = DEFAULT_CALIBRATION_DOMAINS) -> Dict[str, List[str]]:
    """{domain: its calibration texts}, for calibrations that keep each source apart (sequential calibration
    folds)."""
    return {n: domain_set(n, CALIBRATION).texts for n in domains}


def mixed_calibration_texts(domains: Sequence[str] = DEFAULT_CALIBRATION_DOMAINS) -> List[str]:
    """The calibration parts of several domains cut into pieces of at most 150 words and interleaved so that every
    prefix of the list holds about as many words of each domain (the next piece always comes from the domain with
    the fewest words so far, while it has any): a token budget draws on every domain about equally, whatever the
    length of its texts."""
    parts = [[p for t in texts for p in _pieces(t)] for texts in calibration_sources(domains).values()]
    taken, words, out = [0] * len(parts), [0] * len(parts), []
    while True:
        open_ = [i for i, p in enumerate(parts) if taken[i] < len(p)]
        if not open_:
            return out
        i = min(open_, key=lambda j: (words[j], j))
        piece = parts[i][taken[i]]
        out.append(piece)
        taken[i] += 1
        words[i] += len(piece.split())
