"""Corpus preparation mechanisms behind tools/clean_corpus.py, tools/dedup.py and tools/build_mixture.py.

One module per concern: ``jsonl`` (streaming input, bad-line accounting, atomic output),
``parallel`` (bounded, order-preserving process pool), ``normalize``, ``langid``, ``quality``,
``pii``, ``domain``, ``shingles``, ``minhash``, ``simhash``, ``dedup`` (the near-duplicate
index), ``clean`` (the per-document cleaning pipeline), ``tokens`` and ``mixture``.
"""
