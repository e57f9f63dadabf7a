"""The evidence study: pyevo against the simple alternatives, and the paper's ablations, on one teacher.

``python -m pyevo.study`` regenerates ``experiments/RESULTS.md`` (and its plots) from nothing, resuming
where it stopped. Its units of work (:mod:`pyevo.study.plan`):

- *bases*: pyevo runs distilled and searched once (``pyevo.pipeline.run(until="select")``), per
  training seed and for the distillation ablation; every selection of one base starts from a copy of it
  (``--resume`` with later-stage keys changed), so all targets and ablations share its distillation and search;
- *arms*: pyevo's rules at MACs targets, random genomes and hand-picked removal (BK-SDM) from the same
  space, retraining ablations, each retrained like pyevo's student; structural pruning (uniform width,
  Diff-Pruning; :mod:`pyevo.study.pruning`) retrained with the end loss alone under the same schedule;
- *evaluations*: every model's samples at three noise seeds beside the teacher's from the same noise
  (:mod:`pyevo.study.quality`), and, alone at the end, each model's latency beside the teacher's.
"""
