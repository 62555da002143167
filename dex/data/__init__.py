"""Data: phantoms, readers, MedVerse curation into shards, and streaming them into training."""
