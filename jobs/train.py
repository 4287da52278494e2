"""Entrypoint for `ray job submit`: takes the same options as `raygpt train`.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/debug.yaml --storage /shared/runs

Inside a job, RAY_ADDRESS is set, so the trainer joins the cluster the job runs on.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raygpt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
