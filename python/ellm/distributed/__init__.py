"""ellm beyond one machine, on Ray (the extra `ellm[ray]`): a model split into pipeline stages by a
partition plan (`PipelineModel`), and engine replicas behind one OpenAI-compatible endpoint on Ray
Serve (`serve_replicas`)."""

from ..errors import StageFailedError
from ..stage import Stage
from .pipeline import PipelineEngine, PipelineModel

__all__ = ["PipelineModel", "PipelineEngine", "Stage", "StageFailedError"]
