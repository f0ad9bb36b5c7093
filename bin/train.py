#!/usr/bin/env python
"""Train a SCimilarity-style model: ``accelerate launch bin/train.py --tiledb STORE ...``.

Also runs as ``python bin/train.py`` (one process) and as the console script
``scimtrain-train``. ``--help`` lists every flag; without ``--tiledb`` it trains a small model
on a synthetic demo store.
"""

from scimtrain.cli import main

if __name__ == "__main__":
    main()
