"""Unit tests of the harnesses' rounds and derived figures: standard library only, no network,
no root, no tools (`python3 -m unittest discover -s bench/harness -t .` from the repository root)."""
