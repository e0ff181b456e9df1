"""Drafter training: the target's own outputs as data (data.py), the EAGLE-3 / P-EAGLE
entry layout with its attention mask and sequence partition (layout.py), the training
loop (trainer.py) and the `parspec train-drafter` front end (cli.py).

Importing this package is cheap; the heavy modules load on use."""
