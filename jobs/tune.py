"""Entrypoint for `ray job submit`: takes the same options as `raygpt tune`.

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune-debug.yaml \
        --space jobs/spaces/quality-debug.yaml --out /shared/tune/debug

Inside a job, RAY_ADDRESS is set, so the sweep's trials run on the cluster the job runs on.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raygpt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
