"""The evaluation tasks ``dinoflow.evaluation.report`` runs, one module each.

Each task module holds a settings model (a ``dinoflow.config.Strict`` model whose flat keys are
``evaluation.*`` parameters) and ``run(context, settings) -> TaskResult``, wrapped as its ``TASK``:

- ``label_free``: RankMe, alignment, uniformity, view retrieval (any data);
- ``classification``: kNN and linear probe on features extracted once per split (labels);
- ``segmentation``: linear segmentation on composite scenes or a mask folder;
- ``pictures``: PCA maps of patch features.

``context`` holds what the tasks share (``EvalContext``: backbone, splits, the shared settings,
timers, earlier results); ``baselines`` the random-init twin and the raw-pixel option each task
measures beside the backbone. ``report.TASKS`` is the one list of tasks.
"""
