"""``psyche bench distro`` as a script: a simulated DisTrO network vs AdamW, one JSON line.

    python bench/distro_sim.py --peers 4 --steps 300 [--quick] [--overlapped]
"""

import sys

from psyche.cli import app

if __name__ == "__main__":
    app(["bench", "distro", *sys.argv[1:]])
