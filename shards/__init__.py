"""The shards stage: turn an image dataset into WebDataset shards that DALI can stream.

Layout of an output directory:
    <split>-NNNNNN.tar   WebDataset shards; per sample `<key>.cls` (ASCII label),
                         `<key>.cls.i32` (the label as little-endian int32, which DALI reads
                         directly), `<key>.jpg` or `<key>.png`, and for image trees `<key>.json`
    <split>-NNNNNN.idx   DALI's webdataset index (v1.2) for the shard beside it
    manifest.json        splits, shards (sample counts, bytes, sha256), classes, counts
    skipped.jsonl        every input left out, with its path and the reason
    config.yaml, provenance.json   the resolved config and the code's git SHA
"""
