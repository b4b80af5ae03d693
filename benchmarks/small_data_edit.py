"""``edit()`` as the README shows it on 12 invented facts (issue 36 item 6): the small-data defaults and the
degradation measured on a growing sample of G. Prints the wall time and, per epoch, the sampled degradation with
its interval; evaluate the saved edit on all of G with ``editing apply --edit <out>/edits/ball_1e-04 --task
<out>/task/task.yaml`` to compare (docs/results.md, "Small-data defaults and a sampled G").

Usage: ``python benchmarks/small_data_edit.py MODEL OUT`` (e.g. ``tiny-llama runs/small_data``).
"""

from __future__ import annotations

import sys
import time

from editing import edit

FACTS = [("Zorbia", "Quentaville"), ("Plimsk", "Varun"), ("Tarnovy", "Oskelle"), ("Brenmark", "Lutharo"),
         ("Vessaly", "Dorum"), ("Ostrelia", "Kinsby"), ("Marrowind", "Felcastle"), ("Quillon", "Abrantes"),
         ("Sudravia", "Nolwick"), ("Teregan", "Possum Hill"), ("Ulmaris", "Crestova"), ("Yelvarra", "Dunmere")]


def main(model: str, out: str) -> None:
    examples = [{"prefix": f"The capital of {c} is", "suffix": f" {t}"} for c, t in FACTS]
    evaluation = [{"prefix": f"Flights to {c} land in", "suffix": f" {t}"} for c, t in FACTS]
    start = time.perf_counter()
    result = edit(model=model, method="lora", ball=1e-4, loss="good", name="capitals", examples=examples,
                  evaluation=evaluation, hard_negatives=[{"prefix": "The capital of France is", "suffix": " Paris"}],
                  settings={"model.init_args.optimizer.lr": 1e-3, "trainer.enable_progress_bar": False},
                  output_dir=out)
    print(f"edit(): {time.perf_counter() - start:.1f} s wall")
    print(f"ball {result.ball}: epoch {result.result.epoch}, success {result.result.metrics.success_rate}, "
          f"degradation {result.result.metrics.degradation:+.3e}")
    for epoch in result.run.epochs:
        print(f"epoch {epoch.epoch}: {epoch.general_sample}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
