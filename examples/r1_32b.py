"""AutoThink scaling recipe: DeepSeek-R1-Distill-Qwen-32B (configs/r1_32b.yaml). `--help` prints it resolved.

    python examples/r1_32b.py --dry-run --model-path DIR      deepspeed --hostfile hostfile examples/r1_32b.py ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without an install

from at_core.recipe import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(Path(__file__).resolve().parent / "configs" / "r1_32b.yaml"))
