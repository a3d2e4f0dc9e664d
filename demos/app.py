"""The web app on the embedded default model: same as ``neuronscope-tl serve`` (pass its flags, e.g. --port 8000)."""

import sys

from neuronscope_tl.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
