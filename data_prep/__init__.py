"""Offline data preparation: sentencepiece tokenizer training, token sharding, verification.

Entry points (each `python -m data_prep.<name> --help`): train_tokenizer, tokenize, verify,
sample_corpus (what `make data` runs) and bench. The shard format itself lives in
retnet_train.data.manifest so the trainer can read shards without this package.
"""
