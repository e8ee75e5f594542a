"""The synthetic video-QA benchmark and the small model trained on it.

Real checkpoints cannot be loaded on every machine, so answer quality under token compression is
measured here, on generated clips whose answers live in a few patches, with a small Video-LLaVA trained
from scratch on a CPU. This package depends on the framework (`visionzip`, `stages`, `pipelines`), never
the reverse: to the batch job a synthetic set is a manifest and a model folder like any other.

- `clips`: the clip generator, questions and training targets (in memory)
- `dataset`: the clips as mp4 files with a manifest; held-out sets (`python -m synthqa.dataset`)
- `sample_videos`: frame-numbered test videos and the broken files a decoder must survive
- `model`: the synth model's config, building, input features and checkpoint format
- `optim`: batching, optimiser, schedule and update step shared by the two training phases
- `tower`: phase 1, the CLIP tower's pretraining
- `subsets`: the token subsets of phase 2's curriculum
- `lm`: phase 2, projector and LLM on the answers
- `scoring`: in-memory accuracy while training, a checkpoint's fixed-set `metrics.json`
- `train`: the training CLI (`python -m synthqa.train`)
- `demo`: `make demo` (`python -m synthqa.demo +experiment=demo`)
"""
