"""Data formats: ingest sources, webdataset shards, token parquet, the demo dataset."""
