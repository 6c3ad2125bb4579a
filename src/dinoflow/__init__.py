"""dinoflow: faithful DINOv2 pretraining as an orchestrated, reproducible workflow.

The library knows nothing of Kedro: the pipelines in ``dinoflow.pipelines`` call into it.
"""

__version__ = "0.1.0"
