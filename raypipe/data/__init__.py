"""Data: finding shards, tokenizing and packing text inside Ray Data, quickstart data."""
