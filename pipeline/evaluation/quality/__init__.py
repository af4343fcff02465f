"""Sample quality measured offline: metrics (``metrics``), the feature classifier (``classifier``),
the `bfn quality` table (``table``) and the training-time hook (``hook.quality_point``)."""

from pipeline.evaluation.quality.hook import QualitySettings, quality_point
from pipeline.evaluation.quality.metrics import frechet_distance, js_divergence_bits, spelling_accuracy
from pipeline.evaluation.quality.table import quality

__all__ = ["QualitySettings", "frechet_distance", "js_divergence_bits", "quality", "quality_point", "spelling_accuracy"]
