"""A cohort rank that dies mid-write, for the resume test (run under torchrun; not collected by pytest).

    python -m torch.distributed.run --standalone --nproc_per_node 2 Testing/engine/cohort_worker.py IN OUT MODEL

Both ranks run the real `run_cohort` + `segment_file`. Rank 1 waits until rank 0 has finished a case, then opens its
own first output with `files.atomic_path`, writes part of it and is killed (SIGKILL: no clean-up runs), as a
preempted job is; torchrun then ends rank 0 too.
"""

import os
import signal
import sys
import time
from pathlib import Path

from meddinov3.checkpoints import load_model
from meddinov3.engine import segment_file
from meddinov3.engine.cohort import cohort_cases, join_cohort, run_cohort
from meddinov3.files import atomic_path
from meddinov3.volumes import list_inputs


def main() -> None:
    inputs, out, model = sys.argv[1:4]
    info, device = join_cohort("cpu")
    loaded = load_model(model, device=device)
    cases = cohort_cases(list_inputs([inputs]), out)

    def segment_case(case):
        if info.rank == 1:
            deadline = time.monotonic() + 120
            while not any(not p.name.startswith(".") for p in Path(out).glob("*.nii.gz")):
                if time.monotonic() > deadline:
                    sys.exit("rank 0 finished no case in 120 s")
                time.sleep(0.05)
            with atomic_path(case.output) as tmp:
                tmp.write_bytes(b"half a label map")
                os.kill(os.getpid(), signal.SIGKILL)
        return segment_file(case.input, case.output, loaded, device=device).stats

    run_cohort(cases, segment_case, info)


if __name__ == "__main__":
    main()
