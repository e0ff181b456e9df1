"""SPD: speculative pipeline decoding (the target split into pipeline stages, several tokens
of one sequence in flight, drafted by a small module from features at several depths)."""
