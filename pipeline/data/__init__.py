"""Data: the DALI loader over the shards stage's output, its start-up checks and a reference loader."""
