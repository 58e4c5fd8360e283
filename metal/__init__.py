"""Metal kernel bodies (`*.metal`) read with importlib.resources; catalogue in README.md."""
