"""Named text domains: loaders, disjoint splits, provenance records, user sets and bad input."""

import hashlib

import pytest

from neuronscope_tl import domains


@pytest.mark.parametrize("name", list(domains.DOMAINS))
def test_each_domain_loads_and_splits_disjointly(name):
    cal = domains.domain_set(name, domains.CALIBRATION)
    ev = domains.domain_set(name, domains.EVALUATION, calibration_domains=[name])
    every = domains.domain_set(name, domains.ALL)
    assert cal.texts and ev.texts and all(t.strip() for t in every.texts)
    assert cal.texts + ev.texts == every.texts and not set(cal.texts) & set(ev.texts)
    assert ev.in_domain is True and cal.in_domain is None
    rec = ev.record(n_tokens=123)
    assert rec["sha256"] == hashlib.sha256("\n".join(ev.texts).encode()).hexdigest()[:16]
    assert {rec["name"], rec["part"], rec["n_tokens"], rec["n_texts"]} == {name, "evaluation", 123, len(ev.texts)}
    assert rec["source"] and rec["licence"]


def test_news_split_is_the_lee_split():
    import neuronscope_tl as ns

    assert domains.domain_set("news", domains.CALIBRATION).texts == ns.calibration_texts()
    assert domains.domain_set("news", domains.EVALUATION).texts == ns.evaluation_texts()


def test_forum_posts_have_no_headers():
    posts = domains.forum_posts()
    assert len(posts) > 150
    assert not any(p.startswith(("Path:", "From:", "Newsgroups:", "Xref:")) for p in posts)


def test_default_sets_and_mix():
    sets = domains.default_evaluation_sets()
    assert [s.name for s in sets] == list(domains.DEFAULT_CALIBRATION_DOMAINS) + list(domains.DEFAULT_HELD_OUT_DOMAINS)
    assert [s.in_domain for s in sets] == [True] * 3 + [False] * 2
    mix = domains.mixed_calibration_texts()
    parts = [domains.domain_set(n, domains.CALIBRATION).texts for n in domains.DEFAULT_CALIBRATION_DOMAINS]
    # Every word of every calibration text appears once, in order within its domain.
    assert " ".join(mix).split() != [] and sorted(" ".join(mix).split()) == sorted(" ".join(sum(parts, [])).split())
    # The first 30,000 words draw on each domain about equally (whole texts would give docs most of them).
    source = {}
    for n, p in zip(domains.DEFAULT_CALIBRATION_DOMAINS, parts):
        for t in p:
            for w in range(0, len(t.split()), domains.MIX_PIECE_WORDS):
                source[" ".join(t.split()[w : w + domains.MIX_PIECE_WORDS])] = n
    share, words = dict.fromkeys(domains.DEFAULT_CALIBRATION_DOMAINS, 0), 0
    for piece in mix:
        share[source[piece]] += len(piece.split())
        words += len(piece.split())
        if words >= 30_000:
            break
    assert max(share.values()) / min(share.values()) < 1.02, share
    held_out = {w for s in sets if s.in_domain for t in s.texts for w in [t]}
    assert not any(piece in t for t in held_out for piece in mix[:50])  # no evaluation text is calibrated on


def test_user_sets_and_bad_input(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("first text\n\nsecond text\n")
    s = domains.user_set(f"ours={f}")
    assert (s.name, s.texts, s.part) == ("ours", ["first text", "second text"], "user")
    assert domains.user_set(str(f)).name == "mine"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="no non-empty line"):
        domains.user_set(f"e={empty}")
    with pytest.raises(ValueError, match="cannot read text file"):
        domains.user_set(f"x={tmp_path / 'missing.txt'}")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="cannot read text file"):
        domains.user_set(f"b={binary}")
    with pytest.raises(ValueError, match="ours given more than once"):
        domains.check_unique([s, domains.user_set(f"ours={f}")])
    with pytest.raises(ValueError, match="valid domains are news, forum, docs, reviews, legal"):
        domains.domain_set("wiki", domains.EVALUATION)
