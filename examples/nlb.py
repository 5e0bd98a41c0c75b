"""Train LangevinFlow on a Neural Latents Benchmark dataset, score it and write an NLB submission.

    python examples/nlb.py --dataset mc_maze_small --data-dir /work/shared/data --bin-ms 5 --phase val
    python examples/nlb.py --dataset mc_maze_small --data-dir DIR --quick --out runs/smoke
    python examples/nlb.py --dataset mc_maze_small --data-dir DIR --bin-ms 20 --cv 5     # accuracy estimate
    python examples/nlb.py --dataset mc_maze --data-dir ~/dandi --bin-ms 20 --phase test --device cuda
    python examples/nlb.py --dataset mc_maze_small,mc_maze_medium,mc_maze_large --data-dir DIR --bin-ms 20
                                                  # stitched: one model, one submission (docs/stitching.md)

``--data-dir`` holds the DANDI layout (``dandi download DANDI:000140`` gives
``000140/sub-Jenkins/*.nwb``) and/or preprocessed ``{dataset}-{bin:02d}ms-{phase}/`` folders
(train_input.h5, eval_input.h5[, eval_target.h5]).

What happens (see :mod:`pyro_langevin.nlb.pipeline`): validation data are carved from the
training trials only. On the small datasets five models are trained (``eval.n_models``; two at a time
with ``--workers 2``): model i keeps the state with the best co-bps on fold i of the training
trials and fits the other folds, plus the held-in spikes only of its validation trials and the
evaluation trials (``{out}/member{i}/checkpoints/best.pt``); the submission averages their rates
(each the mean of 50 posterior draws, in counts per bin). 5 ms data are fitted in 20 ms bins and
the rates interpolated back to 5 ms (``--fit-bin-ms 5`` fits at 5 ms). ``--set eval.n_models=1``: one model on a
random 20% validation split (``{out}/checkpoints/best.pt``). Scores for the model and the
smoothing baseline, computed in the same run: on each member's validation split (``local``; it
chose that member's checkpoint, so it is optimistic) and, when the eval target is known, on the
evaluation trials (``eval``). ``--cv K`` cross-validates instead: the honest estimate.

Writes ``{out}/metrics.json``, ``{out}/submission.h5`` (model) and
``{out}/submission_smoothing.h5`` (baseline). Prints a table and, last, the metrics JSON.
Errors in the input give a one-line message and exit status 2.
"""

from __future__ import annotations

import sys

from pyro_langevin.nlb.cli import nlb_main


def main(argv=None) -> int:
    return nlb_main(argv, prog="examples/nlb.py")


if __name__ == "__main__":
    sys.exit(main())
