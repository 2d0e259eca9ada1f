"""Train ESMM and BASE (or any models) on the same synthetic splits for several seeds and
print the mean ± std table against the ground truth. A thin wrapper around `funnel compare`:

    python examples/esmm_vs_base.py --seeds 3
    python examples/esmm_vs_base.py --models esmm,esmm_ns,division,base,naive --seeds 3
    funnel compare configs/esmm.yaml --models esmm,base --seeds 3      # the same, from the CLI
"""

from __future__ import annotations

import sys

from funnel.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    config = "configs/esmm.yaml"
    if "--config" in args:
        i = args.index("--config")
        config = args[i + 1]
        del args[i : i + 2]
    sys.exit(main(["compare", config, "trainer.enable_progress_bar=false", *args]))
