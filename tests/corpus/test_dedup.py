import json

import numpy as np
import pytest

from megatron_r1.corpus import minhash, simhash
from megatron_r1.corpus.dedup import DedupConfig, SketchStore, UnionFind, find_duplicates, init_worker, sketch_batch
from megatron_r1.corpus.jsonl import iter_line_batches
from megatron_r1.corpus.parallel import ordered_map
from megatron_r1.corpus.shingles import jaccard, shingle_hashes, shingle_hashes_batch, shingle_strings

THRESHOLD = 0.85


def make_corpus(seed=0, families=60):
    """Texts, and the pairs known to be exact duplicates / near duplicates / related but dissimilar.

    English documents are words drawn from a 3000-word vocabulary, Chinese ones characters from
    2000 Han characters; near duplicates change 1% of the units or reorder paragraphs,
    dissimilar relatives change 30%.
    """
    rng = np.random.default_rng(seed)
    vocabulary = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(3000)]
    han = [chr(0x4E00 + i) for i in range(2000)]
    texts, exact, near, dissimilar = [], [], [], []

    def render(paragraphs, chinese):
        return "\n\n".join(("".join(p) + "。") if chinese else (" ".join(p) + ".") for p in paragraphs)

    def edit(paragraphs, fraction, chinese):
        edited = [list(p) for p in paragraphs]
        total = sum(map(len, edited))
        for _ in range(max(1, int(fraction * total))):
            p = edited[rng.integers(len(edited))]
            p[rng.integers(len(p))] = (
                han[rng.integers(len(han))] if chinese else vocabulary[rng.integers(len(vocabulary))]
            )
        return edited

    for family in range(families):
        chinese = family % 2 == 1
        units = han if chinese else vocabulary
        paragraphs = [[units[i] for i in rng.integers(0, len(units), size=rng.integers(60, 120))] for _ in range(4)]
        base = len(texts)
        texts.append(render(paragraphs, chinese))
        kind = family % 5
        if kind == 0:  # exact copy up to case and whitespace
            texts.append(
                texts[base].upper().replace("\n\n", "\n  \n") if not chinese else texts[base].replace("。", "。 ")
            )
            exact.append((base, base + 1))
        elif kind == 1:  # 1% of the units replaced
            texts.append(render(edit(paragraphs, 0.01, chinese), chinese))
            near.append((base, base + 1))
        elif kind == 2:  # paragraphs reordered
            texts.append(render(paragraphs[::-1], chinese))
            near.append((base, base + 1))
        elif kind == 3:  # heavily edited relative
            texts.append(render(edit(paragraphs, 0.3, chinese), chinese))
            dissimilar.append((base, base + 1))
    return texts, exact, near, dissimilar


def true_jaccard(first, second):
    a, b = set(shingle_strings(first, "auto", 5)), set(shingle_strings(second, "auto", 5))
    return len(a & b) / len(a | b)


def run_dedup(texts, tmp_path, config, workers=1, extra_lines=()):
    path = tmp_path / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        handle.writelines(extra_lines)
    paths = [str(path)]
    store = SketchStore(config, paths, str(tmp_path))
    try:
        for batch in ordered_map(
            sketch_batch, iter_line_batches(paths, batch_lines=16), workers, init_worker, (config,)
        ):
            store.add(batch)
        sketches = store.finish()
        result = find_duplicates(sketches, config, paths, workers)
    finally:
        store.close()
    return sketches, result, store.bad


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


def test_generated_pairs_have_the_intended_similarity(corpus):
    texts, exact, near, dissimilar = corpus
    assert all(true_jaccard(texts[a], texts[b]) == 1.0 for a, b in exact)
    assert all(true_jaccard(texts[a], texts[b]) >= 0.86 for a, b in near)
    assert all(true_jaccard(texts[a], texts[b]) < 0.5 for a, b in dissimilar)


def test_minhash_finds_every_exact_and_near_duplicate_pair_and_nothing_else(corpus, tmp_path):
    texts, exact, near, dissimilar = corpus
    config = DedupConfig(threshold=THRESHOLD)
    sketches, result, bad = run_dedup(texts, tmp_path, config)
    roots = result.roots
    assert bad.total == 0 and len(roots) == len(texts)
    for a, b in exact + near:
        assert roots[a] == roots[b] == a, (a, b, true_jaccard(texts[a], texts[b]))
    for a, b in dissimilar:
        assert roots[a] != roots[b]
    # Everything else is a singleton: exactly one removal per exact / near pair.
    assert int((~result.keep).sum()) == len(exact) + len(near)
    assert result.exact_duplicates == len(exact)
    matches = {(edge.first, edge.second): edge for edge in result.edges}
    for a, b in exact:
        assert matches[(a, b)].match == "exact_text"
    for (a, b), edge in matches.items():
        assert true_jaccard(texts[a], texts[b]) >= THRESHOLD - 0.03
        if edge.match == "jaccard":
            assert edge.similarity == pytest.approx(true_jaccard(texts[a], texts[b]), abs=1e-4)


def test_simhash_option_finds_every_pair_within_the_hamming_distance(corpus, tmp_path):
    texts, exact, near, dissimilar = corpus
    config = DedupConfig(method="simhash", max_distance=6)
    sketches, result, _ = run_dedup(texts, tmp_path, config)
    fingerprints = np.array([simhash.fingerprint(shingle_hashes(text, "auto", 5)) for text in texts], dtype=np.uint64)
    assert np.array_equal(sketches.signatures, fingerprints)
    within = [(a, b) for a, b in near if simhash.hamming_distance(fingerprints[a], fingerprints[b : b + 1])[0] <= 6]
    assert (
        len(within) >= len(near) // 2
    )  # (SimHash approximates cosine similarity: not every J >= 0.9 pair is this close)
    roots = result.roots
    for a, b in exact + within:
        assert roots[a] == roots[b]
    for a, b in dissimilar:
        assert roots[a] != roots[b]
    assert {edge.match for edge in result.edges} <= {"exact_text", "simhash"}
    assert all(edge.similarity >= 1 - 6 / 64 - 1e-4 for edge in result.edges)  # (rounded to 4 digits)


def test_bad_lines_are_counted_and_documents_without_shingles_are_not_indexed(tmp_path):
    texts = ["alpha beta gamma delta epsilon zeta eta theta", "!!! ???", "!!! ???"]
    extra = ["{broken json\n", "\n", '{"text": ""}\n', '{"other": "x"}\n', b"\xff\xfe".decode("latin-1") + "\n"]
    sketches, result, bad = run_dedup(texts, tmp_path, DedupConfig(), extra_lines=extra)
    assert bad.counts == {"invalid_json": 2, "blank_line": 1, "empty_document": 1, "missing_key": 1}
    assert sketches.indexable.tolist() == [True, False, False]
    assert result.roots.tolist() == [0, 1, 1]  # punctuation-only texts: still exact duplicates


def test_batched_shingles_match_single_texts_and_the_string_reference():
    texts = [
        "Hello, World! The quick brown fox jumps over the lazy dog.",
        "你好，世界！今天天气很好，我们去公园散步吧。",
        "",
        "a b",
        "mixed 中文 and English words here",
        "İstanbul STRASSE ǅ",
    ]
    hashes, offsets = shingle_hashes_batch(texts, "auto", 3)
    for index, text in enumerate(texts):
        single = shingle_hashes(text, "auto", 3)
        assert np.array_equal(hashes[offsets[index] : offsets[index + 1]], single)
        assert len(np.unique(single)) == len(set(shingle_strings(text, "auto", 3)))
    assert shingle_strings("a b", "word", 3) == ["a b"]  # shorter than n: one shingle of everything
    assert shingle_strings("你好世界", "auto", 3) == ["你好世", "好世界"]
    assert shingle_strings("Hello, World! Hi", "word", 2) == ["hello world", "world hi"]


def test_minhash_estimate_tracks_jaccard_and_banding_reaches_the_threshold():
    rng = np.random.default_rng(1)
    universe = rng.integers(0, 1 << 63, size=3000, dtype=np.uint64)
    first, second = universe[:2000], universe[1000:]
    hashes = np.concatenate([first, second])
    signatures = minhash.signatures(hashes, np.array([0, 2000, 4000]), 256, seed=1)
    estimate = float(minhash.estimated_jaccard(signatures[0], signatures[1:])[0])
    assert estimate == pytest.approx(jaccard(np.unique(first), np.unique(second)), abs=0.1)  # true value 1/3
    for threshold, num_perm in [(0.85, 128), (0.8, 128), (0.5, 64)]:
        bands, rows = minhash.optimal_bands_rows(threshold, num_perm)
        assert bands * rows <= num_perm
        assert 1 - (1 - threshold**rows) ** bands >= minhash.MIN_RECALL_AT_THRESHOLD


def test_simhash_blocks_never_miss_a_pair_within_the_distance():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 1 << 63, size=200, dtype=np.uint64)
    flips = [rng.choice(64, size=3, replace=False) for _ in range(200)]
    near = np.array([int(b) ^ sum(1 << int(bit) for bit in bits) for b, bits in zip(base, flips)], dtype=np.uint64)
    keys_base, keys_near = simhash.block_keys(base, 3), simhash.block_keys(near, 3)
    assert np.all((keys_base == keys_near).any(axis=1))
    assert np.all(simhash.hamming_distance(base[0], near[:1]) == 3)


def test_union_find_keeps_the_smallest_id_as_root():
    union_find = UnionFind(6)
    for a, b in [(4, 5), (3, 4), (5, 1)]:
        union_find.union(a, b)
    assert union_find.roots().tolist() == [0, 1, 2, 1, 1, 1]
    assert [union_find.find(i) for i in range(6)] == [0, 1, 2, 1, 1, 1]
